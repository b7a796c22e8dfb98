"""Rebuilding a study's records from MLflow (sage_dist/tune/from_mlflow.py) on a SQLite store in tmp_path."""

from __future__ import annotations

import json

from tests.conftest import tiny_config

from sage_dist.tune.from_mlflow import RECORD_ARTIFACT_DIR, records_from_mlflow
from sage_dist.tune.grid import GridStudy, Variant, read_records


def test_variants_with_one_configuration_each_get_their_own_records(tmp_path):
    """Two variants whose configs are equal (they differ in procedure only, like encoder 1 alone and the transfer
    test) are told apart by the record's variant; a record whose config is not its cell's is not used."""
    import mlflow

    study = GridStudy(name="twins", question="q", base=tiny_config(), seeds=(0,),
                      variants=(Variant(name="alone"), Variant(name="transferred", procedure="transfer",
                                                               source_model="tiny-sd")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("oq.twins", artifact_location=str(tmp_path / "artifacts"))
    configs = {"alone": study.variant_config(study.variants[0], 0).to_flat_dict(),
               "transferred": study.variant_config(study.variants[1], 0).to_flat_dict(),
               "stale": study.variant_config(study.variants[0], 0).replace_flat({"optim.lr": 0.5}).to_flat_dict()}
    assert configs["alone"] == configs["transferred"]
    for name, variant, value in (("alone", "alone", 0.25), ("transferred", "transferred", 0.75),
                                 ("stale", "alone", 0.99)):
        run = client.create_run(exp, tags={"study": "twins"})
        folder = tmp_path / "upload" / name
        folder.mkdir(parents=True)
        record = {"study": "twins", "variant": variant, "seed": 0, "status": "ok", "config": configs[name],
                  "metrics": {"RER_domain": value}}
        (folder / f"{variant}__s0.json").write_text(json.dumps(record, default=list))
        client.log_artifacts(run.info.run_id, str(folder), RECORD_ARTIFACT_DIR)
        client.set_terminated(run.info.run_id)

    found = records_from_mlflow(study, uri, "oq.twins", tmp_path / "out")
    assert (found.runs, found.without_record, found.other_config) == (3, 0, 1)
    got = {r["variant"]: r["metrics"]["RER_domain"] for r in read_records(tmp_path / "out", "twins")}
    assert got == {"alone": 0.25, "transferred": 0.75}


def test_a_shipped_file_matches_wherever_the_package_is_installed():
    from sage_dist.tune.from_mlflow import _normalised

    here = {"attack.template_library": "/work/a/sage_dist/attack/data/coco_mined_templates.txt", "optim.lr": 1e-3}
    there = {**here, "attack.template_library": "/tmp/b/sage_dist/attack/data/coco_mined_templates.txt"}
    other = {**here, "attack.template_library": "/tmp/b/sage_dist/attack/data/templates_other.txt"}
    user = {**here, "attack.template_library": "/home/u/sage_dist/my_templates.txt"}  # not shipped: kept as given
    user_elsewhere = {**here, "attack.template_library": "/srv/sage_dist/my_templates.txt"}
    assert _normalised(here) == _normalised(there) != _normalised(other)
    assert _normalised(user) != _normalised(user_elsewhere)
