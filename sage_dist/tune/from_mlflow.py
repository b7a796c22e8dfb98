"""A grid study's trial records read back from the MLflow tracking server, so its report's tables can be
rebuilt from MLflow alone (``python studies/<study>.py --report-only --from-mlflow``).

Every trial of a launched grid study logs its record (the JSON the report reads: metrics, per-image outcomes,
configuration) and its KID side file as artifacts of its own run, under :data:`RECORD_ARTIFACT_DIR`
(:func:`sage_dist.tune.grid_runner.grid_trial`). :func:`records_from_mlflow` downloads them from the study's
experiment and keeps, for each cell of the study's grid (variant, seed), a record whose configuration equals
the cell's exactly (so trials of another concept, budget or code path in the same experiment never count):
the latest ok one, else the latest failed one. Cells without such a record are reported missing, with their
count, by the report itself.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_dist.tracking import resolve_tracking
from sage_dist.tracking.mlflow_tracker import tracking_client

log = logging.getLogger(__name__)

RECORD_ARTIFACT_DIR = "trial_record"
"""Artifact folder of a trial run holding its record ``<variant>__s<seed>.json`` and KID side file."""


def _normalised(config: dict[str, Any]) -> str:
    """A configuration as comparable text; where it was tracked (``tracking.*``) and where the package was
    installed (a path to a file shipped in ``sage_dist/``, e.g. the mined template library) do not change the
    numbers."""
    def value(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, str) and (m := _PACKAGE_PATH.match(v)) and (_PACKAGE / m.group(1)).is_file():
            return f"sage_dist/{m.group(1)}"
        return v

    return json.dumps({k: value(v) for k, v in config.items() if not k.startswith("tracking.")}, sort_keys=True,
                      default=str)


_PACKAGE = Path(__file__).resolve().parents[1]
"""This installation's ``sage_dist`` folder."""
_PACKAGE_PATH = re.compile(r"^.*/sage_dist/(.+)$")
"""A path into some installation's ``sage_dist`` folder; only files this package ships are read as equal."""


@dataclass
class MlflowRecords:
    """What :func:`records_from_mlflow` found."""

    experiment: str
    runs: int
    """Trial runs of the study in the experiment."""
    without_record: int
    """Trial runs without a record artifact (killed before they ended, or logged by an older version)."""
    other_config: int
    """Records whose configuration matches no cell of the study (another concept, budget, seeds)."""
    found: bool = True
    """Whether the experiment exists."""


def records_from_mlflow(study, tracking_uri: str, experiment: str, out_dir: str | Path) -> MlflowRecords:
    """Download the records of ``study``'s cells from ``experiment`` into ``out_dir`` (the layout
    :func:`sage_dist.tune.grid.read_records` reads: ``<out>/<study>/trials/``).

    Args:
        study: the :class:`~sage_dist.tune.grid.GridStudy` whose cells are looked for.
        tracking_uri: as ``--tracking-uri`` ("" = the local store).
        experiment: the study's MLflow experiment, e.g. ``claims.methods``.
    Returns:
        What was found (an experiment that does not exist: ``found=False``, no records).
    Raises:
        ConnectionError: the tracking server does not answer (from MLflow's client).
    """
    from sage_dist.tune.grid import grid_cells, trial_path

    client = tracking_client(resolve_tracking(tracking_uri).tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # nothing of this study was logged here: every cell reads missing
        log.warning("MLflow experiment %r not found at %s: every cell of %s reads missing", experiment,
                    tracking_uri or "the local store", study.name)
        return MlflowRecords(experiment=experiment, runs=0, without_record=0, other_config=0, found=False)
    # by cell, not by configuration: two variants may share one (encoder 1 alone and the transfer test differ only
    # in their procedure)
    wanted = {(v.name, seed): _normalised(study.variant_config(v, seed).to_flat_dict()) for v, seed in grid_cells(study)}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.study = '{study.name}'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    chosen: dict[tuple[str, int], tuple[dict[str, Any], Path]] = {}
    without, other = 0, 0
    with tempfile.TemporaryDirectory(prefix="sage_mlflow_records_") as tmp:
        for run in runs:
            names = [f.path for f in client.list_artifacts(run.info.run_id, RECORD_ARTIFACT_DIR)]
            json_names = [n for n in names if n.endswith(".json")]
            if not json_names:
                without += 1
                continue
            folder = Path(client.download_artifacts(run.info.run_id, RECORD_ARTIFACT_DIR, tmp + f"/{run.info.run_id}"))
            record = json.loads((folder / Path(json_names[0]).name).read_text())
            cell = (record.get("variant"), record.get("seed"))
            if wanted.get(cell) != _normalised(record.get("config", {})):
                other += 1
                continue
            previous = chosen.get(cell)
            if previous is None or record["status"] == "ok" or previous[0]["status"] != "ok":
                chosen[cell] = (record, folder)  # runs in start order: the latest ok one wins
        for (variant, seed), (record, folder) in chosen.items():
            dest = trial_path(out_dir, study.name, variant, seed)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(record, indent=1))
            if record.get("features_file") and (folder / record["features_file"]).is_file():
                shutil.copyfile(folder / record["features_file"], dest.parent / record["features_file"])
    log.info("%s: %d trial runs, %d records of this grid, %d without a record, %d of another configuration",
             experiment, len(runs), len(chosen), without, other)
    return MlflowRecords(experiment=experiment, runs=len(runs), without_record=without, other_config=other)
