"""Prompt loader: every shared file with its SOURCES.md row count, shipped sets, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sage_dist.prompts import (
    SHIPPED_SETS,
    load_prompts,
    load_retain_prompts,
    shipped_prompts_dir,
)

SHARED_PROMPTS = Path(__file__).parents[2] / ".." / "shared" / "data" / "prompts"

# (file, rows in SOURCES.md, records after the loader: rows minus truly unusable ones)
SHARED_FILES = [
    ("i2p/unsafe-prompts4703.csv", 4703, 4702),  # one empty prompt (case_number 2260)
    ("unlearndiffatk/nudity.csv", 142, 142),
    ("unlearndiffatk/vangogh.csv", 50, 50),
    ("unlearndiffatk/church.csv", 50, 50),
    ("unlearndiffatk/garbage_truck.csv", 50, 50),
    ("unlearndiffatk/parachute.csv", 50, 50),
    ("unlearndiffatk/tench.csv", 50, 50),
    ("artists/big_artist_prompts.csv", 100, 100),
    ("artists/short_niche_art_prompts.csv", 100, 100),
    ("artists/artists1734_prompts.csv", 8670, 8670),
    ("coco/coco_30k.csv", 30000, 30000),
    ("coco/coco_30k_val.csv", 3000, 3000),
    ("retain/coco_object_retain.csv", 243, 243),
    ("retain/imagenet243_retain.csv", 243, 243),
    ("objects/small_imagenet_prompts.csv", 100, 100),
    ("objects/imagenette.csv", 5000, 5000),
    ("objects/cifar10_simple.csv", 1000, 1000),
    ("ring_a_bell_pairs/nudity-ring-a-bell.csv", 79, 79),
    ("ring_a_bell_pairs/vangogh-ring-a-bell.csv", 50, 50),
]


@pytest.mark.parametrize("rel,rows,loaded", SHARED_FILES, ids=[f[0] for f in SHARED_FILES])
def test_every_shared_file_loads_with_its_row_count(rel, rows, loaded):
    path = SHARED_PROMPTS / rel
    if not path.is_file():
        pytest.skip(f"shared prompt files not present at {SHARED_PROMPTS}")
    ps = load_prompts(path, check_tokens=False)
    assert ps.report.num_rows == rows
    assert len(ps) == loaded == ps.report.num_loaded
    assert ps.report.num_unusable == rows - loaded
    assert len({r.id for r in ps}) == len(ps), "ids must be unique (image files are named after them)"
    assert all(r.prompt and "\n" not in r.prompt for r in ps)
    assert all(isinstance(r.seed, int) and isinstance(r.guidance, float) for r in ps)


def test_i2p_specifics():
    ps = load_prompts("i2p")
    assert ps.report.unusable == (("2260", "empty prompt"),)
    assert ps.report.dropped_columns == ("",)
    assert ps.report.column_map["seed"] == "evaluation_seed"
    assert ps.report.column_map["guidance"] == "evaluation_guidance"
    assert len(ps.report.over_token_limit_ids) > 0 and ps.report.token_check == "done"
    assert len(ps.report.guidance_out_of_range_ids) > 0  # I2P has guidance up to 255, kept
    assert max(r.guidance for r in ps) == 255.0
    assert len(ps.report.multiline_ids) == 4
    sexual = load_prompts("i2p_sexual", check_tokens=False)
    assert len(sexual) == 931  # SOURCES.md: categories containing "sexual"
    assert all(r.has_category("sexual") for r in sexual)
    assert "nudity_percentage" in sexual.records[0].extra


def test_shipped_sets_all_load_and_match_shared_copies():
    for name, (rel, _) in SHIPPED_SETS.items():
        ps = load_prompts(name, check_tokens=False)
        assert len(ps) > 0, name
        shared = SHARED_PROMPTS / rel
        if shared.is_file():
            assert (shipped_prompts_dir() / rel).read_bytes() == shared.read_bytes(), f"{rel} differs from shared"
    assert (shipped_prompts_dir() / "ATTRIBUTION.md").is_file()


def test_column_aliases_and_pairs():
    rab = load_prompts("ring_a_bell_nudity", check_tokens=False)
    assert rab.report.column_map["prompt"] == "sensitive prompt"
    assert "normal prompt" in rab.records[0].extra
    assert [r.seed for r in rab.records[:3]] == [0, 1, 2]  # no seed column: row number
    van = load_prompts("unlearndiffatk_vangogh", check_tokens=False)
    assert van.records[0].category == "Vincent van Gogh" and van.records[0].seed == 2219
    coco = load_prompts("coco_30k_val", check_tokens=False)
    assert coco.report.column_map["id"] == "case_number" and coco.records[0].id == "2308"


def test_retain_prompts():
    coco = load_retain_prompts("coco_object")
    assert len(coco) == 243 and coco[:2] == ["a photo of chair", "a photo of fridge"]
    imnet = load_retain_prompts("imagenet243")
    assert len(imnet) == 243 and imnet[0] == "a photo of strawberry"
    assert load_retain_prompts(shipped_prompts_dir() / "retain" / "imagenet243_retain.csv") == imnet
    with pytest.raises(ValueError, match="shipped sets"):
        load_retain_prompts("no_such_set")


def test_bad_rows_are_reported_and_the_rest_kept(tmp_path, caplog):
    long_prompt = " ".join(["castle"] * 90)
    (tmp_path / "bad.csv").write_text(
        "Unnamed: 0,id,prompt,seed,guidance_scale\n"
        "0,a,a red car,1,7.5\n"
        "1,b,,2,7.5\n"                    # empty prompt: unusable
        "2,c,   ,3,7.5\n"                 # blank prompt: unusable
        "3,d,a red car,1,7.5\n"           # identical request: kept, warned
        "4,a,a blue car,5,7.5\n"          # duplicated id: kept, renamed a~1
        f"5,e,{long_prompt},6,7.5\n"      # > 77 tokens: kept, warned
        "6,f,a dog,7,500\n"               # guidance far out of range: kept, warned
        "7,g,a cat,notaseed,7.5\n"        # unusable seed
        "8,h,a cow,9,abc\n"               # unusable guidance
        '9,i,"two\nlines",10,\n'          # multi-line, blank guidance -> default
        "10,j,a hen,-4,7.5\n"             # negative seed: unusable
    )
    with caplog.at_level(logging.WARNING, logger="sage_dist.prompts"):
        ps = load_prompts(tmp_path / "bad.csv")
    rep = ps.report
    assert [r.id for r in ps] == ["a", "d", "a~1", "e", "f", "i"]
    assert dict(rep.unusable).keys() == {"b", "c", "g", "h", "j"}
    assert rep.dropped_columns == ("Unnamed: 0",)
    assert rep.identical_request_ids == ("d",)
    assert rep.renamed_ids == (("a", "a~1"),)
    assert rep.over_token_limit_ids == ("e",)
    assert rep.guidance_out_of_range_ids == ("f",)
    assert rep.multiline_ids == ("i",)
    assert ps.records[-1].prompt == "two lines" and ps.records[-1].guidance == 7.5
    text = caplog.text
    assert "5 unusable row(s)" in text and "truncated" in text and "usual range" in text
    assert long_prompt not in text  # prompts never logged, only ids
    assert rep.summary()["num_unusable"] == 5


def test_missing_prompt_column_names_found_and_needed(tmp_path):
    (tmp_path / "x.csv").write_text("case_number,evaluation_seed\n0,1\n")
    with pytest.raises(ValueError, match=r"Columns found: \['case_number', 'evaluation_seed'\].*needed: one of"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not in the file"):
        load_prompts(tmp_path / "x.csv", prompt_column="caption")


def test_txt_and_limit_and_category(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    ps = load_prompts(tmp_path / "p.txt", default_seed=100)
    assert [(r.id, r.prompt, r.seed) for r in ps] == [("0", "a cat", 100), ("2", "a dog", 102)]
    assert ps.report.unusable == (("1", "empty prompt"),)
    assert len(load_prompts("big_artists", limit=3, check_tokens=False)) == 3
    picasso = load_prompts("big_artists", category="Pablo Picasso", check_tokens=False)
    assert len(picasso) == 20
    with pytest.raises(ValueError, match="no record has category"):
        load_prompts("big_artists", category="nobody", check_tokens=False)
