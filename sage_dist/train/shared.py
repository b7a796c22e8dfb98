"""Frozen-model work shared by the trials of a study: computed once per study, model, concept and seed, exactly.

A trial computes three things from the frozen model alone, none of which depends on a searched parameter (γt,
J, top-k, warm-up): the loaded pipeline, the trajectory bank (frozen DDIM rollouts and the frozen predictions
on them, :class:`~sage_dist.models.sampler.TrajectoryBank`) and the τ_o conditioning of the retain prompts;
its evaluation adds the original model's images. This module shares them:

* **The pipeline**: :func:`frozen_pipeline` keeps the loaded pipeline in the process. A study's one-worker
  trials run in long-lived Tune actors (``reuse_actors``, :mod:`sage_dist.tune.trial`), so each actor loads it
  once and every later trial on it starts with the pipeline in memory. On a GPU node each trial needs the
  frozen weights in its own GPU's memory anyway, so the actor's copy is the least one trial can have; on a
  CPU node it is one copy per concurrent trial, not one per trial.
* **τ_o features and the trajectory bank**: a :class:`FrozenCache` per :func:`cache_fields` key, kept in
  memory per process and persisted in the study folder (``<study>/frozen_cache/<digest>/``), so that trials in
  other processes (the other actors, Ray Train workers of multi-worker trials, other nodes on the shared study
  storage, a resumed study) read what earlier trials computed.
* **The original model's evaluation images** are cached on disk by
  :func:`sage_dist.eval.world.original_images` (keyed by the pipeline's weights hash, the prompts, the seeds and
  the sampling settings); every trial after the first reads them.

**Exact.** Every cached value is a pure function of its key: a bank entry is computed in a UNet call of its
own, and a retain prompt's τ_o in a fixed chunk of the retain set (:data:`sage_dist.train.step.TAU_O_CHUNK`),
never in a batch whose composition depends on the order a run asks for them. A trial that reads the cache
therefore gets the same floats as one that computes everything itself, and its losses, encoder and metrics
are identical (``tests/component/test_frozen_cache.py``; the floats differ between CPU kinds and thread
counts, which are part of the key).

**Keyed, never silently reused.** :func:`cache_fields` names everything the values depend on: the frozen
weights (a hash of the UNet, text encoders, VAE and scheduler config), the concepts, the seed, the Ray Train
rank, the DDIM steps, the start guidance, the bank size, the retain prompts, pooling, dtypes, the device kind
(CPU instruction set or GPU name) and torch threads, and the library versions. The folder is named by the
digest of those fields, and its ``key.json`` holds them: a folder whose ``key.json`` (or a shard whose
metadata) names another key — another model or concept, a cache copied from elsewhere — is reported with the
fields that differ and rebuilt, never read.

**Files.** ``key.json`` and one safetensors shard per trial that computed something new
(``shard-<time>-<pid>.safetensors``, written to a temporary name and renamed, so a killed trial leaves no
partial shard; an unreadable shard is skipped with a warning). Shards are only ever added, so concurrent
trials need no lock; two trials that computed the same entry both write it, with the same value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sage_dist.config import StudyConfig
from sage_dist.eval.world import pipeline_hash
from sage_dist.files import ensure_writable_folder
from sage_dist.models.load import load_pipeline
from sage_dist.models.sampler import BankState
from sage_dist.models.text import Conditioning

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of what the cache holds and how it is computed; part of the key, so a change invalidates old caches."""
KEY_FILE = "key.json"
MAX_OPEN_CACHES = 4
"""Caches a process keeps in memory (least recently used dropped first)."""
MAX_PIPELINES = 1
"""Pipelines a process keeps loaded (a study uses one frozen model)."""

_PIPELINES: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_CACHES: OrderedDict[str, "FrozenCache"] = OrderedDict()
_HASHES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- the pipeline, once per process

def frozen_pipeline(model_id: str, *, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, bool]:
    """The frozen pipeline of ``model_id`` in ``dtype`` on ``device``, loaded once per process
    (:func:`sage_dist.models.load.load_pipeline`); returns ``(pipe, reused)``, ``reused`` True when it was
    already loaded. The pipeline is shared: callers must not change its modules (runs train copies of the text
    encoders, ESD-x a copy of the UNet, and evaluation edits shallow copies).

    Raises:
        ValueError: a bad model id or folder.
    """
    key = (str(model_id), str(dtype), str(torch.device(device)))
    if key in _PIPELINES:
        _PIPELINES.move_to_end(key)
        return _PIPELINES[key], True
    while len(_PIPELINES) >= MAX_PIPELINES:
        _PIPELINES.popitem(last=False)
    pipe = load_pipeline(model_id, dtype=dtype, device=device)
    _PIPELINES[key] = pipe
    return pipe, False


def frozen_weights_hash(pipe) -> str:
    """:func:`sage_dist.eval.world.pipeline_hash` of ``pipe`` (UNet, text encoders, VAE, scheduler config),
    computed once per pipeline object (hex, 16 characters)."""
    if pipe not in _HASHES:
        _HASHES[pipe] = pipeline_hash(pipe)
    return _HASHES[pipe]


# ---------------------------------------------------------------- the key

def device_kind(device: torch.device) -> str:
    """``"cpu:AVX512"`` (the instruction set PyTorch's kernels use) or ``"cuda:<GPU name>"``: floats computed on
    one kind are not those of another."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def cache_fields(cfg: StudyConfig, pipe, retain_prompts: list[str], *, rank: int = 0) -> dict[str, Any]:
    """Everything the cached values of a run of ``cfg`` on ``pipe`` depend on (JSON-ready); see the module
    docstring. ``retain_prompts``: the run's retain set (after cleaning), as :class:`~sage_dist.train.step.Eraser`
    gets it; ``rank``: the Ray Train rank (each rank draws its own start noises)."""
    import diffusers

    device = pipe.unet.device
    prompts = hashlib.sha256(json.dumps(list(retain_prompts)).encode()).hexdigest()[:16]
    return {
        "format": CACHE_FORMAT, "weights": frozen_weights_hash(pipe), "model_id": cfg.model.model_id,
        "concepts": list(cfg.erase.erase_concept), "seed": cfg.optim.seed, "rank": rank,
        "ddim_steps": cfg.erase.ddim_steps, "start_guidance": cfg.erase.start_guidance,
        "rollout_bank_size": cfg.erase.rollout_bank_size, "retain_prompts": prompts,
        "num_retain_prompts": len(retain_prompts), "pooling": cfg.retain.pooling,
        "train_dtype": cfg.model.train_dtype, "frozen_dtype": str(pipe.unet.dtype),
        "sample_size": int(pipe.unet.config.sample_size), "vae_scale_factor": int(pipe.vae_scale_factor),
        "device": device_kind(device), "torch_threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }


def fields_digest(fields: dict[str, Any]) -> str:
    """sha256 (hex, 24 characters) of the key fields: the cache folder's name."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(set(found) | set(expected))
    return ", ".join(f"{k} {found.get(k)!r} (expected {expected.get(k)!r})" for k in keys
                     if found.get(k) != expected.get(k))


# ---------------------------------------------------------------- the cache

class FrozenCache:
    """τ_o conditioning of retain prompts and a trajectory-bank state, for one :func:`cache_fields` key.

    :class:`~sage_dist.train.step.Eraser` reads and extends :attr:`tau_o` and :attr:`bank` in place
    (``frozen_cache=``); :meth:`persist` writes what is new to the study folder, :meth:`refresh` reads what
    other processes wrote. Open one with :func:`open_frozen_cache`.
    """

    def __init__(self, fields: dict[str, Any], folder: str | Path | None, device: torch.device):
        self.fields = dict(fields)
        self.digest = fields_digest(self.fields)
        self.folder = Path(folder) / self.digest if folder else None
        """``<root>/<digest>``, or None for a cache that is never persisted."""
        self.device = device
        self.tau_o: dict[str, Conditioning] = {}
        """Retain prompt -> its τ_o conditioning, 1 row."""
        self.bank = BankState()
        self._shards_read: set[str] = set()
        self._stored_tau_o: set[str] = set()
        self._stored_levels: set[tuple[str, int, int]] = set()
        self._stored_targets: set[tuple[str, int, int]] = set()

    # ---- counts ------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Entries held now: ``tau_o`` prompts, bank ``levels`` (latents) and ``targets`` (frozen predictions)."""
        return {"tau_o": len(self.tau_o), "levels": sum(len(v) for v in self.bank.levels.values()),
                "targets": len(self.bank.targets)}

    # ---- reading -----------------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Read the shards in the folder not read yet (written by other processes); returns the entries added.
        A ``key.json`` naming another key is reported and its folder emptied (rebuilt); an unreadable shard
        or one whose metadata names another key is skipped with a warning."""
        if self.folder is None:
            return 0
        self._check_key_file()
        added = 0
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self._shards_read:
                continue
            self._shards_read.add(path.name)
            try:
                added += self._read_shard(path)
            except Exception as err:  # noqa: BLE001 - a truncated or foreign shard costs only its recomputation
                log.warning("frozen cache shard %s skipped (%s: %s); its entries are recomputed", path,
                            type(err).__name__, err)
        return added

    def _check_key_file(self) -> None:
        key_file = self.folder / KEY_FILE
        if key_file.is_file():
            try:
                found = json.loads(key_file.read_text())
            except ValueError:
                found = {"unreadable": str(key_file)}
            if found == self.fields:
                return
            log.warning("frozen cache %s was built for another key (%s); rebuilding it", self.folder,
                        _differences(found, self.fields))
            for path in self.folder.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            self._shards_read.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.fields, indent=1, sort_keys=True))
        os.replace(tmp, key_file)

    def _read_shard(self, path: Path) -> int:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("digest") != self.digest:
                raise ValueError(f"its metadata names key {meta.get('digest')!r}, not {self.digest!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        entries = [tuple(e) for e in json.loads(meta["entries"])]
        prompts = json.loads(meta["tau_o_prompts"])
        added = 0
        if prompts:
            cond = _conditioning_from(tensors, "tau_o.", self.device)
            for j, prompt in enumerate(prompts):
                if prompt not in self.tau_o:
                    self.tau_o[prompt] = cond.select(torch.tensor([j], device=self.device))
                    added += 1
                self._stored_tau_o.add(prompt)
        state = BankState()
        if "levels" in tensors:
            levels = tensors["levels"].to(self.device)
            for n, (e, i) in enumerate(tensors["levels_index"].tolist()):
                key, slot = entries[e]
                state.levels.setdefault((key, slot), {})[i] = levels[n : n + 1]
                self._stored_levels.add((key, slot, i))
        if "targets_index" in tensors:
            eps_u, eps_c = tensors["targets_eps_uncond"].to(self.device), tensors["targets_eps_cond"].to(self.device)
            for n, (e, i, t) in enumerate(tensors["targets_index"].tolist()):
                key, slot = entries[e]
                state.targets[(key, slot, i)] = (int(t), eps_u[n : n + 1], eps_c[n : n + 1])
                self._stored_targets.add((key, slot, i))
        return added + self.bank.merge(state)

    # ---- writing -----------------------------------------------------------------------------------------
    def persist(self) -> int:
        """Write the entries not on disk yet as one new shard; returns how many (0: nothing written).

        Raises:
            OSError: the shard could not be written (the folder's other shards are intact).
        """
        if self.folder is None:
            return 0
        new_tau = [p for p in self.tau_o if p not in self._stored_tau_o]
        new_levels = [(e, i) for e, levels in self.bank.levels.items() for i in levels
                      if (*e, i) not in self._stored_levels]
        new_targets = [k for k in self.bank.targets if k not in self._stored_targets]
        if not (new_tau or new_levels or new_targets):
            return 0
        entry_ids: dict[tuple[str, int], int] = {}
        for e in [e for e, _ in new_levels] + [(k, s) for k, s, _ in new_targets]:
            entry_ids.setdefault(e, len(entry_ids))
        tensors: dict[str, Tensor] = {}
        if new_tau:
            tensors.update(_conditioning_tensors(Conditioning.cat([self.tau_o[p] for p in new_tau]), "tau_o."))
        if new_levels:
            tensors["levels"] = torch.cat([self.bank.levels[e][i] for e, i in new_levels])
            tensors["levels_index"] = torch.tensor([[entry_ids[e], i] for e, i in new_levels], dtype=torch.int64)
        if new_targets:
            values = [self.bank.targets[k] for k in new_targets]
            tensors["targets_eps_uncond"] = torch.cat([v[1] for v in values])
            tensors["targets_eps_cond"] = torch.cat([v[2] for v in values])
            tensors["targets_index"] = torch.tensor([[entry_ids[(k, s)], i, v[0]] for (k, s, i), v in
                                                     zip(new_targets, values)], dtype=torch.int64)
        meta = {"digest": self.digest, "entries": json.dumps([list(e) for e in entry_ids]),
                "tau_o_prompts": json.dumps(new_tau)}
        self._write_shard({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)
        self._stored_tau_o.update(new_tau)
        self._stored_levels.update((*e, i) for e, i in new_levels)
        self._stored_targets.update(new_targets)
        return len(new_tau) + len(new_levels) + len(new_targets)

    def _write_shard(self, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        self._check_key_file()
        name = f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        self._shards_read.add(name)


def _conditioning_tensors(cond: Conditioning, prefix: str) -> dict[str, Tensor]:
    out = {f"{prefix}encoder_hidden_states": cond.encoder_hidden_states}
    for k, v in (cond.added_cond_kwargs or {}).items():
        out[f"{prefix}added.{k}"] = v
    for e, (feature, final) in enumerate(zip(cond.features, cond.final)):
        out[f"{prefix}features.{e}"], out[f"{prefix}final.{e}"] = feature, final
    return out


def _conditioning_from(tensors: dict[str, Tensor], prefix: str, device: torch.device) -> Conditioning:
    def get(name: str) -> Tensor:
        return tensors[f"{prefix}{name}"].to(device)

    added = {k[len(f"{prefix}added."):]: get(k[len(prefix):]) for k in tensors if k.startswith(f"{prefix}added.")}
    encoders = sum(1 for k in tensors if k.startswith(f"{prefix}features."))
    return Conditioning(get("encoder_hidden_states"), added or None, [get(f"features.{e}") for e in range(encoders)],
                        [get(f"final.{e}") for e in range(encoders)])


def open_frozen_cache(root: str | Path | None, fields: dict[str, Any], *, device: torch.device) -> FrozenCache:
    """The process's :class:`FrozenCache` for ``fields`` (one is kept per key, so a long-lived trial actor keeps it
    in memory), refreshed from ``<root>/<digest>``; a new one when the process has none. ``root`` None or "":
    kept in memory only.

    Raises:
        ValueError: ``root`` cannot be created or written (before anything is computed).
    """
    if root:
        ensure_writable_folder(root, "frozen cache folder")
    digest = fields_digest(fields)
    handle = f"{Path(root).resolve() if root else ''}:{digest}:{device}"
    cache = _CACHES.get(handle)
    if cache is None:
        while len(_CACHES) >= MAX_OPEN_CACHES:
            _CACHES.popitem(last=False)
        cache = _CACHES[handle] = FrozenCache(fields, root or None, device)
    _CACHES.move_to_end(handle)
    cache.refresh()
    return cache


def clear_process_caches() -> None:
    """Forget this process's loaded pipelines and open caches (frees their memory; the study folder's cache
    stays): the next run loads the pipeline again and reads the cache from disk, as a new process would."""
    _PIPELINES.clear()
    _CACHES.clear()
