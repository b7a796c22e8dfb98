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


# ---- malformed files: each is a clear ValueError naming the file (and line) and the fix, or a reported row ----
def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_missing_file_folder_and_unknown_name(tmp_path):
    with pytest.raises(ValueError, match=r"prompt file '.*nope.csv' does not exist"):
        load_prompts(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope")
    with pytest.raises(ValueError, match="is a folder"):
        load_prompts(tmp_path)
    with pytest.raises(ValueError, match="did you mean 'i2p_sexual'"):
        load_prompts("i2p_sexaul")
    with pytest.raises(ValueError, match=r"unknown prompt file type '.json'.*\.csv.*\.txt"):
        load_prompts(_write(tmp_path, "p.json", '{"prompt": "a cat"}'))


@pytest.mark.parametrize("name,data", [("e.csv", b""), ("w.csv", b"  \n\n"), ("e.txt", b""), ("b.txt", b"\n \n\t\n"),
                                       ("bom.txt", b"\xef\xbb\xbf\n")])
def test_empty_files_are_errors(tmp_path, name, data):
    with pytest.raises(ValueError, match=rf"{name} is empty"):
        load_prompts(_write(tmp_path, name, data))


def test_header_without_rows_and_no_usable_row(tmp_path):
    with pytest.raises(ValueError, match=r"has a header row \(columns \['prompt', 'seed'\]\) but no data rows"):
        load_prompts(_write(tmp_path, "h.csv", "prompt,seed\n"))
    with pytest.raises(ValueError, match=r"none of its 3 data row\(s\) is usable: 'empty prompt' \(2 row\(s\), first at "
                                         r"line 2\); \"seed 'x' is not an integer"):
        load_prompts(_write(tmp_path, "u.csv", "prompt,seed\n,1\n  ,2\na cat,x\n"))


@pytest.mark.parametrize("suffix", [".csv", ".txt"])
@pytest.mark.parametrize("codec,expected", [("utf-8-sig", "utf-8-sig"), ("utf-16", "utf-16"), ("utf-16-be", "utf-16"),
                                            ("utf-32", "utf-32")])
def test_byte_order_marks_are_honoured(tmp_path, suffix, codec, expected):
    text = "prompt,seed\na café,3\nein Bär,4\n" if suffix == ".csv" else "a café\nein Bär\n"
    data = text.encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data
    ps = load_prompts(_write(tmp_path, "p" + suffix, data), check_tokens=False)
    assert ps.prompts() == ["a café", "ein Bär"]  # no "\ufeff" glued to the first prompt
    assert ps.report.encoding == expected
    if suffix == ".csv":
        assert [r.seed for r in ps] == [3, 4]


def test_non_utf8_files_say_how_to_convert(tmp_path):
    path = _write(tmp_path, "latin.csv", "prompt\na photo\na café au lait\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8: byte 0xe9 at line 3, column 6 \(probably "
                                         r"Windows-1252 / Latin-1\); save it as UTF-8 \(e.g. `iconv -f WINDOWS-1252.*"
                                         r"encoding='cp1252'"):
        load_prompts(path)
    assert load_prompts(path, encoding="cp1252", check_tokens=False).prompts() == ["a photo", "a café au lait"]
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        load_prompts(path, encoding="klingon")
    with pytest.raises(ValueError, match="UTF-16 without a byte-order mark.*iconv -f UTF-16LE"):
        load_prompts(_write(tmp_path, "u16.txt", "a cat\na dog\n".encode("utf-16-le")))
    with pytest.raises(ValueError, match="NUL byte at line 2, column 3: it is not a text file"):
        load_prompts(_write(tmp_path, "nul.txt", b"a cat\na \x00dog\n"))
    with pytest.raises(ValueError, match=r"is a spreadsheet or archive \(an Excel workbook\?\).*'CSV UTF-8'"):
        load_prompts(_write(tmp_path, "book.csv", b"PK\x03\x04\x14\x00\x06\x00[Content_Types].xml"))


@pytest.mark.parametrize("name,text,delimiter", [
    ("semi.csv", "id;prompt;seed\na;a cat, sitting;5\nb;a dog;6\n", ";"),
    ("tab.csv", "id\tprompt\tseed\na\ta cat, sitting\t5\nb\ta dog\t6\n", "\t"),
    ("tab.tsv", "id\tprompt\tseed\na\ta cat, sitting\t5\nb\ta dog\t6\n", "\t"),
    ("excel.csv", "sep=;\nid;prompt;seed\na;a cat, sitting;5\nb;a dog;6\n", ";"),
])
def test_other_delimiters_are_read(tmp_path, caplog, name, text, delimiter):
    with caplog.at_level(logging.WARNING, logger="sage_dist.prompts"):
        ps = load_prompts(_write(tmp_path, name, text), check_tokens=False)
    assert [(r.id, r.prompt, r.seed) for r in ps] == [("a", "a cat, sitting", 5), ("b", "a dog", 6)]
    assert ps.report.delimiter == delimiter
    if name in ("semi.csv", "tab.csv"):
        assert "-separated" in caplog.text


def test_txt_that_is_a_csv_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"first line 'case_number,prompt,evaluation_seed' is a CSV header.*rename "
                                         r"the file to \.csv"):
        load_prompts(_write(tmp_path, "p.txt", "case_number,prompt,evaluation_seed\n0,a cat,1\n"))
    with pytest.raises(ValueError, match="is a CSV header"):
        load_prompts(_write(tmp_path, "q.txt", "prompt\na cat\n"))
    # a prompt with commas is still a prompt
    assert load_prompts(_write(tmp_path, "r.txt", "a cat, a dog\nprompt engineering, text\n"),
                        check_tokens=False).prompts() == ["a cat, a dog", "prompt engineering, text"]


def test_wrong_column_names_give_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"Columns found: \['Prompt_Text', 'seed'\]; needed: one of \['prompt'.*"
                                         r"Column 'Prompt_Text' looks like the prompt column: rename it to 'prompt'"):
        load_prompts(_write(tmp_path, "c.csv", "Prompt_Text,seed\na cat,1\n"))
    with pytest.raises(ValueError, match="the file has no header: add a first line such as 'prompt,seed'"):
        load_prompts(_write(tmp_path, "n.csv", "a cat,1\na dog,2\n"))
    with pytest.raises(ValueError, match=r"the header repeats column\(s\) \['prompt'\] \(line 1\)"):
        load_prompts(_write(tmp_path, "r.csv", "prompt,prompt\na,b\n"))


def test_csv_quoting_problems(tmp_path):
    ps = load_prompts(_write(tmp_path, "c.csv", "id,prompt\n1,a cat, sitting\n2,a dog\n"), check_tokens=False)
    assert ps.prompts() == ["a dog"]  # never the silently cut "a cat"
    (rid, why), = ps.report.unusable
    assert rid == "1" and "has 3 fields but the header has 2" in why and ps.report.unusable_lines == (2,)
    with pytest.raises(ValueError, match=r"q.csv, line 3: malformed CSV.*must close it"):
        load_prompts(_write(tmp_path, "q.csv", 'prompt,seed\na dog,1\n"a cat,2\na cow,3\n'))


def test_non_finite_and_out_of_range_numbers_are_unusable_rows(tmp_path):
    rows = [("a", "ok", "1", "7.5"), ("b", "g nan", "2", "nan"), ("c", "g inf", "3", "inf"),
            ("d", "g neg", "4", "-7.5"), ("e", "g comma", "5", '"7,5"'), ("f", "s nan", "nan", "7.5"),
            ("g", "s inf", "inf", "7.5"), ("h", "s neg", "-1", "7.5"), ("i", "s frac", "1.5", "7.5"),
            ("j", "s big", str(2**64), "7.5"), ("k", "s float", "12.0", "0"), ("l", "ctrl\x07", "6", "7.5")]
    text = "id,prompt,seed,guidance\n" + "".join(",".join(r) + "\n" for r in rows)
    ps = load_prompts(_write(tmp_path, "n.csv", text), check_tokens=False)
    assert [(r.id, r.seed, r.guidance) for r in ps] == [("a", 1, 7.5), ("k", 12, 0.0)]
    reasons = dict(ps.report.unusable)
    assert set(reasons) == set("bcdefghijl")
    assert "not a finite number" in reasons["b"] and "not a finite number" in reasons["c"]
    assert "negative; classifier-free guidance must be >= 0" in reasons["d"]  # was "kept as written"
    assert "decimal comma" in reasons["e"]
    assert all("not an integer in [0, 2**64)" in reasons[k] for k in "fghij")
    assert "control character U+0007" in reasons["l"]
    assert ps.report.guidance_out_of_range_ids == ("k",)  # 0 is allowed but unusual
    assert ps.report.unusable_lines == tuple(range(3, 12)) + (13,)


def test_duplicate_ids_stay_unique_and_unsafe_ids_are_rows(tmp_path):
    ps = load_prompts(_write(tmp_path, "d.csv", "id,prompt\na,p1\na,p2\na~1,p3\n../x,p4\nb/c,p5\n"), check_tokens=False)
    assert [r.id for r in ps] == ["a", "a~2", "a~1"]
    assert ps.report.renamed_ids == (("a", "a~2"),)
    assert [i for i, _ in ps.report.unusable] == ["../x", "b/c"]
    assert "cannot name an image file" in ps.report.unusable[0][1]


def test_bad_arguments(tmp_path):
    path = _write(tmp_path, "p.txt", "a cat\n")
    with pytest.raises(ValueError, match="limit=0: must be >= 1"):
        load_prompts(path, limit=0)
    with pytest.raises(ValueError, match="default_guidance=nan: must be a finite number >= 0"):
        load_prompts(path, default_guidance=float("nan"))
    with pytest.raises(ValueError, match=r"default_seed=-1: must be an integer in \[0, 2\*\*64\)"):
        load_prompts(path, default_seed=-1)
