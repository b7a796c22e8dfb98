"""Checkpoints of an erasure run: safetensors tensors plus a JSON of scalars (never pickles).

A checkpoint folder holds ``trainable.safetensors`` (the trainable encoders' full state dicts),
``optimizer.safetensors`` (Adam moments), ``state.safetensors`` (RNG states, retain-sampler permutation,
each concept's latest attack prompt) and ``state.json`` (step, config, history, Adam step counts, attack
logs). Resuming from it ends with the same encoder, bit for bit, as an uninterrupted run (tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sage_dist.attack.prompt import AttackPrompt


def save_checkpoint(path: str | Path, eraser, *, step: int, history: list[dict]) -> Path:
    """Write the state after ``step`` completed steps into folder ``path``; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
        attack_meta[name] = {"index": n, "template": cstate.attack.template if cstate.attack else None,
                             "log": cstate.attack_log}
    save_file({k: v.cpu() for k, v in state.items()}, path / "state.safetensors")
    meta = {"step": step, "config": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in eraser.cfg.to_flat_dict().items()},
            "history": history, "adam_steps": opt_steps, "attacks": attack_meta}
    (path / "state.json").write_text(json.dumps(meta))
    return path


def load_checkpoint(path: str | Path, eraser) -> tuple[int, list[dict]]:
    """Restore ``eraser`` from folder ``path``; returns ``(completed_steps, history)``.

    Raises:
        ValueError: the folder is not a checkpoint, or it was written with a different configuration
            (other than ``optim.num_steps`` and ``scaling.*``, which may change on resume).
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a sage_dist checkpoint (no state.json)")
    meta = json.loads((path / "state.json").read_text())
    mine = {k: list(v) if isinstance(v, tuple) else v for k, v in eraser.cfg.to_flat_dict().items()}
    diff = [k for k in mine if not k.startswith(("optim.num_steps", "scaling.", "tracking."))
            and meta["config"].get(k) != mine[k]]
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
    return int(meta["step"]), list(meta["history"])
