"""Checkpoints of an erasure run: safetensors tensors plus a JSON of scalars (never pickles).

A checkpoint folder holds ``trainable.safetensors`` (the trainable encoders' full state dicts),
``optimizer.safetensors`` (Adam moments), ``state.safetensors`` (RNG states, retain-sampler permutation,
each concept's latest attack prompt) and ``state.json`` (step, config, history, Adam step counts, attack
logs). Resuming from it ends with the same encoder, bit for bit, as an uninterrupted run (tested).

Writes are atomic: a checkpoint is written into a hidden sibling folder (``.step_N.partial-<pid>``) and renamed
into place only when every file is on disk, so a crash, a kill or a full disk mid-write leaves the previous
checkpoints as they were (a ``step_N`` folder is always complete). The same staging is used by
:func:`publish_folder` for a run's final outputs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sage_dist.attack.prompt import AttackPrompt

CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
"""Checkpoint folders are ``step_<completed steps, 6 digits>``."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""errnos of a full disk or an exhausted quota."""


def checkpoint_name(step: int) -> str:
    """``step_000040`` for 40 completed steps."""
    return f"step_{step:06d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder`` (``step_N`` folders with a ``state.json``), oldest first;
    ``[]`` when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the most completed steps in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """Completed steps of checkpoint folder ``path`` (read from its ``state.json``).

    Raises:
        ValueError: ``path`` is not a checkpoint folder.
    """
    return int(_read_meta(Path(path))["step"])


def publish_folder(final: str | Path, write: Callable[[Path], None], *, what: str, intact: str) -> Path:
    """Atomically create folder ``final``: ``write(staging)`` fills a hidden sibling folder, which then replaces
    ``final`` by a rename (an existing ``final`` is removed only after the new one is in place).

    Args:
        final: the folder to create or replace.
        write: fills the folder it is given.
        what: names the folder in errors, e.g. ``"checkpoint runs/x/checkpoints/step_000040"``.
        intact: what a failed write leaves untouched, for the error message.
    Raises:
        OSError: with the original errno; on a full disk the message says ``no space left on device while
            writing <what>; <intact>``. The staging folder is removed in every case.
    """
    final = Path(final)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    _stage(staging, write, what=what, intact=intact)
    replaced = final.parent / f".{final.name}.replaced-{os.getpid()}"
    if final.exists():
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def publish_entries(folder: str | Path, write: Callable[[Path], None], *, names: tuple[str, ...], what: str,
                    intact: str) -> Path:
    """Replace the entries ``names`` of ``folder`` (files or folders) with those ``write(staging)`` creates in a
    hidden staging folder inside ``folder``; nothing in ``folder`` changes unless ``write`` succeeds.

    Each entry is swapped by two renames, in the order of ``names`` (put the entry that marks a finished
    result last); an entry of ``names`` that ``write`` does not create is removed, so a stale
    ``text_encoder_2/`` of an earlier run never sits beside a new ``text_encoder/``.

    Raises:
        OSError: as :func:`publish_folder`.
    """
    folder = Path(folder)
    staging = folder / f".outputs.partial-{os.getpid()}"
    _stage(staging, write, what=what, intact=intact)
    replaced = folder / f".outputs.replaced-{os.getpid()}"
    replaced.mkdir(exist_ok=True)
    for name in names:
        if (folder / name).exists():
            os.replace(folder / name, replaced / name)
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return folder


def _stage(staging: Path, write: Callable[[Path], None], *, what: str, intact: str) -> None:
    """``write(staging)`` into a fresh ``staging`` folder and flush it to disk; on any failure the folder is
    removed, and a full disk becomes an ``OSError`` that says what was being written and what is intact."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        _fsync_tree(staging)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise OSError(err.errno, f"no space left on device while writing {what}; {intact}; free some space "
                                     "and run again") from err
        raise


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so the rename that follows never publishes a half-written file
    after a power loss."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(path: str | Path, eraser, *, step: int, history: list[dict]) -> Path:
    """Write the state after ``step`` completed steps into folder ``path`` (atomically, see module
    docstring); returns it.

    Raises:
        OSError: the write failed; the folder is then absent (or, if it existed, unchanged) and every other
            checkpoint beside it intact. On a full disk the message names the latest intact checkpoint.
    """
    path = Path(path)
    previous = [p for p in list_checkpoints(path.parent) if p.name != path.name]
    intact = (f"the previous checkpoint {previous[-1]} is intact (resume with --resume-from {previous[-1]})"
              if previous else "no earlier checkpoint was touched")
    return publish_folder(path, lambda folder: _write_checkpoint(folder, eraser, step=step, history=history),
                          what=f"checkpoint {path}", intact=intact)


def _write_checkpoint(path: Path, eraser, *, step: int, history: list[dict]) -> None:
    trainable = {k: v.detach().contiguous() for k, v in eraser.trainable_module.state_dict().items()}
    save_file(trainable, path / "trainable.safetensors")

    opt_tensors, opt_steps = {}, {}
    params = eraser.trainable_parameters
    for j, p in enumerate(params):
        st = eraser.optimizer.state.get(p)
        if st:
            opt_tensors[f"{j}.exp_avg"] = st["exp_avg"].contiguous()
            opt_tensors[f"{j}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            opt_steps[str(j)] = float(st["step"])
    save_file(opt_tensors, path / "optimizer.safetensors")

    state = {"generator": eraser.generator.get_state(), "shared_generator": eraser.shared_generator.get_state()}
    if eraser.retain_sampler is not None:
        state.update({f"retain.{k}": v for k, v in eraser.retain_sampler.state().items()})
    attack_meta = {}
    for n, (name, cstate) in enumerate(eraser.concepts.items()):
        if cstate.attack is not None:
            state.update({f"attack{n}.{k}": v.contiguous() for k, v in cstate.attack.state().items()})
        for i, found in enumerate(cstate.found):
            state.update({f"found{n}.{i}.{k}": v.clone() for k, v in found.state().items()})  # own storage: ids are shared with the latest attack
        attack_meta[name] = {"index": n, "template": cstate.attack.template if cstate.attack else None,
                             "log": cstate.attack_log, "found_templates": [f.template for f in cstate.found]}
    save_file({k: v.cpu() for k, v in state.items()}, path / "state.safetensors")
    meta = {"step": step, "config": _flat_config(eraser.cfg),
            "history": history, "adam_steps": opt_steps, "attacks": attack_meta}
    (path / "state.json").write_text(json.dumps(meta))


def prune_checkpoints(folder: str | Path, keep: list[Path]) -> list[Path]:
    """Delete every complete checkpoint in ``folder`` that is not in ``keep`` (an earlier run's included), and
    staging folders that a killed process left behind; returns the deleted checkpoints.

    The caller names what to keep (the latest checkpoints it wrote itself), so a stale checkpoint of an
    abandoned run with a higher step number never outlives a fresh run's own checkpoints."""
    folder = Path(folder)
    kept = {Path(p).resolve() for p in keep}
    doomed = [p for p in list_checkpoints(folder) if p.resolve() not in kept]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".step_") and (".partial-" in p.name or ".replaced-" in p.name) and \
                    not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)
    return doomed


def _flat_config(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()}


def _read_meta(path: Path) -> dict:
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a sage_dist checkpoint (no state.json); give a folder "
                         "OUT/checkpoints/step_N written by sage-dist erase")
    return json.loads((path / "state.json").read_text())


def config_mismatch(path: str | Path, cfg) -> list[str]:
    """The config keys whose values differ between checkpoint ``path`` and ``cfg`` (``optim.num_steps``,
    ``scaling.*`` and ``tracking.*`` may change on resume and are not compared).

    Raises:
        ValueError: ``path`` is not a checkpoint folder.
    """
    meta = _read_meta(Path(path))
    mine = _flat_config(cfg)
    return [k for k in mine if not k.startswith(("optim.num_steps", "scaling.", "tracking."))
            and meta["config"].get(k) != mine[k]]


def load_checkpoint(path: str | Path, eraser) -> tuple[int, list[dict]]:
    """Restore ``eraser`` from folder ``path``; returns ``(completed_steps, history)``.

    Raises:
        ValueError: the folder is not a checkpoint, or it was written with a different configuration
            (other than ``optim.num_steps`` and ``scaling.*``, which may change on resume).
    """
    path = Path(path)
    meta = _read_meta(path)
    diff = config_mismatch(path, eraser.cfg)
    if diff:
        raise ValueError(f"checkpoint {path} was written with a different configuration ({', '.join(diff)}); "
                         "resume with the same settings or start a new run")
    device = eraser.sampler.device
    eraser.trainable_module.load_state_dict({k: v.to(device) for k, v in
                                                  load_file(path / "trainable.safetensors").items()})
    opt = load_file(path / "optimizer.safetensors")
    for j, p in enumerate(eraser.trainable_parameters):
        if str(j) in meta["adam_steps"]:
            eraser.optimizer.state[p] = {"step": torch.tensor(meta["adam_steps"][str(j)]),
                                         "exp_avg": opt[f"{j}.exp_avg"].to(device),
                                         "exp_avg_sq": opt[f"{j}.exp_avg_sq"].to(device)}
    state = load_file(path / "state.safetensors")
    eraser.generator.set_state(state["generator"])
    eraser.shared_generator.set_state(state["shared_generator"])
    if eraser.retain_sampler is not None:
        eraser.retain_sampler.load_state({"order": state["retain.order"], "position": state["retain.position"]})
    for name, info in meta["attacks"].items():
        cstate = eraser.concepts[name]
        cstate.attack_log = info["log"]
        prefix = f"attack{info['index']}."
        sub = {k[len(prefix):]: v.to(device) for k, v in state.items() if k.startswith(prefix)}
        cstate.attack = AttackPrompt.from_state(sub, info["template"]) if sub else None
        cstate.found = []
        for i, template in enumerate(info.get("found_templates", [])):
            prefix = f"found{info['index']}.{i}."
            sub = {k[len(prefix):]: v.to(device) for k, v in state.items() if k.startswith(prefix)}
            cstate.found.append(AttackPrompt.from_state(sub, template))
    return int(meta["step"]), list(meta["history"])
