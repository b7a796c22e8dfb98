"""Markdown report of grid studies: per study a table (every metric pooled over seeds with its 95 % interval),
paired comparisons against a reference variant, per-seed values, plots and findings in numbers.

Works on trial records alone (``grid.read_records(..., features=True)`` or hand-made dicts with ``variant``,
``seed``, ``status``, ``metrics``, ``curves`` and, from world trials, ``outcomes`` and ``features``), so a
report can be rewritten from a finished run without Ray::

    python studies/methods.py --report-only --out runs/methods

How a cell is computed (docs/METHOD.md "Evaluation"; ``value ± half-width (n)``, the half-width of the 95 %
interval; where its two sides differ by more than half the half-width, e.g. a rate near 0 or 1, the cell
gives its bounds instead, ``value [low, high] (n)``):

* from the per-image outcomes (:func:`sage_dist.eval.world.world_outcomes`) of the variant's trials, pooled
  over its seeds: **rates** (erasure and concept rates, retention, neighbour retention, pre-ASR, ASR per
  attack) with the Wilson interval of the pooled counts (n: images or attacked prompts); **RER** (and
  ``retention_drop``) with a paired bootstrap over images, stratified by seed (each seed's images resampled
  within that seed, the edited and the original image of a prompt and noise together); **KID**: the mean over
  seeds of each seed's unbiased KID against the true renders, bootstrap over generated images (within seed)
  and renders (n: generated images);
* every other metric (costs, curves' summaries, ...) is a per-trial number: its mean over seeds with the
  Student-t interval of that mean (n: seeds);
* records without per-image outcomes (older runs) give mean ± standard deviation over seeds, labelled "sd".

These intervals are over images given the trained models: they say how precisely the evaluation measured
these erasures, not how much another training seed would move them; the per-seed table shows that spread.
A per-trial rate that a trial logs with its counts (``<m>_k`` hits of ``<m>_n`` images, e.g.
``found_prompt_concept_rate``) is pooled over seeds like the per-image rates (Wilson on the summed counts).
A variant with fewer finished trials than the study's seeds is marked in every cell ("2 of 3 seeds"); a
variant with none reads "missing".

**Paired comparisons** (``GridStudy.reference_variant``): two variants' trials at the same seed drew every
evaluation and red-team image from the same prompt and initial latents (the evaluation's noise seed is the
trial seed; checked with the outcomes' ``plan_hash``), so each difference is bootstrapped with the two
variants' images of one prompt and noise resampled together, stratified by seed, over the seeds both finished.
An interval that excludes 0 supports a difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sage_dist.eval.metrics import (
    _counts,
    _kid_from_counts,
    _poly_kernel,
    bootstrap_interval,
    kid,
    wilson_interval,
)
from sage_dist.tune.grid import GridStudy
from sage_dist.world.concepts import ATTRIBUTES

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("FID", "KID", "ASR", "concept_rate", "drop", "drift", "unet_calls")
"""Metric-name fragments whose smaller values are better (also names ending in "_s", durations; everything
else: larger is better)."""
NEUTRAL = ("interference",)
"""Metric-name fragments with no better direction (findings name the highest and lowest)."""
REPORT_SEED = 0
"""Seed of every bootstrap resampling in the report (the same records give the same report)."""
RESAMPLES = 2000
"""Bootstrap resamples per interval."""
PHRASE_SETS = ("word", "synonyms", "heldout")


def lower_is_better(metric: str) -> bool:
    return any(frag in metric for frag in LOWER_IS_BETTER) or metric.endswith(("_s", "_per_step"))


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def aggregate(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[float, float, int]]:
    """``{variant: (mean, std, n)}`` of ``metric`` over the ``ok`` records with a finite value (std: sample
    standard deviation, ddof=1; 0 for a single seed)."""
    values: dict[str, list[float]] = {}
    for r in _ok(records):
        v = r.get("metrics", {}).get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            values.setdefault(r["variant"], []).append(float(v))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.3g} ± {std:.2g}" if n > 1 else f"{mean:.3g}"


# ---------------------------------------------------------------- cells

@dataclass(frozen=True, kw_only=True)
class Cell:
    """One table cell: a value with its 95 % interval (or sd), the count behind it and how it was computed."""

    value: float
    low: float = float("nan")
    high: float = float("nan")
    n: int = 0
    """Images or prompts pooled (``unit``), or seeds for per-trial numbers."""
    unit: str = "images"
    """"images", "prompts" or "seeds"."""
    method: str = "wilson"
    """"wilson", "bootstrap", "t" (interval of the mean over seeds), "sd" (no per-image outcomes: mean ± sd),
    "single" (one seed, no interval) or "missing"."""
    sd: float = float("nan")
    """Standard deviation over seeds (``method="sd"`` only)."""
    seeds: int = 0
    """Seeds pooled."""
    expected: int = 0
    """Seeds the study asked for."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2 if math.isfinite(self.low) and math.isfinite(self.high) else float("nan")

    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high) and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        """``value ± half-width (n)`` (see the module docstring for the other forms)."""
        if self.method == "missing":
            return f"missing (0 of {self.expected} seeds)"
        if not math.isfinite(self.value):
            return "n/a"
        if self.method == "sd":
            body = f"{self.value:.3g} ± {self.sd:.2g} sd" if self.seeds > 1 else f"{self.value:.3g}"
        elif not math.isfinite(self.half_width):
            body = f"{self.value:.3g} (no interval)"
        elif abs((self.high - self.value) - (self.value - self.low)) > 0.5 * self.half_width:
            body = f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"
        else:
            body = f"{self.value:.3g} ± {self.half_width:.2g}"
        partial = bool(self.expected) and self.seeds < self.expected
        if self.unit == "seeds" or self.method == "sd":
            count = f"{self.seeds} of {self.expected} seeds" if partial else f"{self.seeds} seeds"
        else:
            count = f"{self.n}; {self.seeds} of {self.expected} seeds" if partial else f"{self.n}"
        return f"{body} ({count})"


# ---------------------------------------------------------------- per-image outcomes of one variant

ATTRIBUTES_FIRST = next(iter(ATTRIBUTES))


@dataclass
class Units:
    """The per-image outcomes of one variant's trials (ok records with ``outcomes``), concatenated in seed
    order: concept-domain images, held-out retain images, red-team prompts; ``*_stratum`` is the seed's index."""

    seeds: list[int]
    concepts: list[str]
    attributes: list[str]
    d_edited: np.ndarray
    d_original: np.ndarray
    d_concept: np.ndarray
    d_set: np.ndarray
    d_stratum: np.ndarray
    r_labels: dict[str, np.ndarray]
    r_edited: dict[str, np.ndarray]
    r_original: dict[str, np.ndarray]
    r_stratum: np.ndarray
    t_pre: np.ndarray | None = None
    t_post: dict[str, np.ndarray] = field(default_factory=dict)
    t_concept: np.ndarray | None = None
    t_stratum: np.ndarray | None = None
    independent: list[str] = field(default_factory=list)
    features: list[dict[str, np.ndarray]] | None = None
    """Per seed: "edited", "original", "reference" ``[N, 128]``; None when a record has no side file."""
    keys: dict[int, str] = field(default_factory=dict)
    """Seed -> hash of everything that pairs two variants' images (prompts, noise seeds, labels)."""

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> "Units":
        records = sorted(records, key=lambda r: r["seed"])
        first = records[0]["outcomes"]
        concepts, attributes = list(first["concepts"]), list(first["attributes"])
        d = {k: [] for k in ("e", "o", "c", "s", "z")}
        r_labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
        r_edited: dict[str, list] = {a: [] for a in ATTRIBUTES}
        r_original: dict[str, list] = {a: [] for a in ATTRIBUTES}
        r_stratum: list[int] = []
        t = {"pre": [], "c": [], "z": []}
        t_post: dict[str, list] = {}
        independent: list[str] = []
        features: list | None = []
        keys = {}
        has_red_team = all("red_team" in r["outcomes"] for r in records)
        for z, record in enumerate(records):
            out = record["outcomes"]
            if list(out["concepts"]) != concepts:
                raise ValueError(f"variant {record['variant']}: seed {record['seed']} erased {out['concepts']}, "
                                 f"another seed {concepts}")
            for ci, c in enumerate(concepts):
                for si, name in enumerate(PHRASE_SETS):
                    e, o = out["domain"][c][name]["edited"], out["domain"][c][name]["original"]
                    d["e"] += e
                    d["o"] += o
                    d["c"] += [ci] * len(e)
                    d["s"] += [si] * len(e)
                    d["z"] += [z] * len(e)
            retain = out["retain"]
            for a in ATTRIBUTES:
                r_labels[a] += retain["labels"][a]
                r_edited[a] += retain["edited"][a]
                r_original[a] += retain["original"][a]
            r_stratum += [z] * len(retain["labels"][ATTRIBUTES_FIRST])
            pairing = {"plan": out["plan_hash"], "labels": retain["labels"]}
            if has_red_team:
                rt_keys = sorted(out["red_team"][concepts[0]]["post"])
                for ci, c in enumerate(concepts):
                    rt = out["red_team"][c]
                    if sorted(rt["post"]) != rt_keys:
                        raise ValueError(f"variant {record['variant']}: red-team attacks differ between concepts")
                    t["pre"] += rt["pre"]
                    t["c"] += [ci] * len(rt["pre"])
                    t["z"] += [z] * len(rt["pre"])
                    for k in rt_keys:
                        t_post.setdefault(k, []).extend(rt["post"][k])
                    independent = list(rt["independent"])
                    pairing[f"red_team/{c}"] = {"prompts": rt["prompts"], "seeds": rt["seeds"]}
            keys[int(record["seed"])] = hashlib.sha256(json.dumps(pairing, sort_keys=True).encode()).hexdigest()[:16]
            feats = record.get("features")
            if features is not None and isinstance(feats, dict) and {"edited", "original", "reference"} <= set(feats):
                features.append({k: np.asarray(feats[k], dtype=np.float64) for k in ("edited", "original", "reference")})
            else:
                features = None
        as_bool = lambda x: np.asarray(x, dtype=bool)  # noqa: E731
        units = cls(seeds=[int(r["seed"]) for r in records], concepts=concepts, attributes=attributes,
                    d_edited=as_bool(d["e"]), d_original=as_bool(d["o"]), d_concept=np.asarray(d["c"], dtype=int),
                    d_set=np.asarray(d["s"], dtype=int), d_stratum=np.asarray(d["z"], dtype=int),
                    r_labels={a: np.asarray(v) for a, v in r_labels.items()},
                    r_edited={a: as_bool(v) for a, v in r_edited.items()},
                    r_original={a: as_bool(v) for a, v in r_original.items()},
                    r_stratum=np.asarray(r_stratum, dtype=int), features=features, keys=keys)
        if has_red_team:
            units.t_pre, units.t_concept = as_bool(t["pre"]), np.asarray(t["c"], dtype=int)
            units.t_stratum = np.asarray(t["z"], dtype=int)
            units.t_post = {k: as_bool(v) for k, v in t_post.items()}
            units.independent = independent
        return units


# ---------------------------------------------------------------- metric definitions on units

@dataclass(frozen=True)
class Spec:
    """How a metric is computed from :class:`Units`: which units (``kind``: "domain", "retain", "red_team"),
    which of them (``mask``), the statistic of resampled unit indices (``value``), and for a rate the boolean
    column whose pooled count gets a Wilson interval."""

    kind: str
    mask: Callable[[Units], np.ndarray]
    value: Callable[[Units, np.ndarray], np.ndarray]
    """(units restricted by ``mask``, indices ``[..., M]``) -> value per resample ``[...]``."""
    rate: Callable[[Units], np.ndarray] | None = None
    """Boolean column ``[M]`` of the masked units (rates only)."""


def _restrict(units: Units, kind: str, mask: np.ndarray) -> dict[str, Any]:
    """The masked units' columns of ``kind`` as a flat dict of arrays (all of length M)."""
    if kind == "domain":
        return {"e": units.d_edited[mask], "o": units.d_original[mask], "c": units.d_concept[mask],
                "s": units.d_set[mask], "z": units.d_stratum[mask]}
    if kind == "retain":
        cols: dict[str, Any] = {"z": units.r_stratum[mask]}
        for a in ATTRIBUTES:
            cols[f"label/{a}"] = units.r_labels[a][mask]
            cols[f"edited/{a}"] = units.r_edited[a][mask]
            cols[f"original/{a}"] = units.r_original[a][mask]
        return cols
    cols = {"pre": units.t_pre[mask], "c": units.t_concept[mask], "z": units.t_stratum[mask]}
    cols.update({f"post/{k}": v[mask] for k, v in units.t_post.items()})
    return cols


def _rer(cols: dict[str, np.ndarray], idx: np.ndarray, concepts: list[int]) -> np.ndarray:
    e, o, c = cols["e"][idx], cols["o"][idx], cols["c"][idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = [1.0 - (e & (c == g)).sum(-1) / (o & (c == g)).sum(-1) for g in concepts]
    return np.mean(values, axis=0)


def _domain_mask(concept: int | None, sets: tuple[int, ...]):
    def mask(u: Units) -> np.ndarray:
        m = np.isin(u.d_set, sets)
        return m if concept is None else m & (u.d_concept == concept)
    return mask


def _retain_hits(cols: dict[str, np.ndarray], side: str, attributes: list[str]) -> np.ndarray:
    return np.logical_and.reduce([cols[f"{side}/{a}"] for a in attributes])


def metric_spec(name: str, units: Units) -> Spec | None:
    """The :class:`Spec` of ``name`` on these units, or None when ``name`` is not computed from per-image
    outcomes (a per-trial number) or the units lack what it needs (e.g. no red team ran)."""
    concept_name, base = name.split("/", 1) if "/" in name else (None, name)
    if concept_name is not None and concept_name not in units.concepts:
        return None
    ci = None if concept_name is None else units.concepts.index(concept_name)
    groups = list(range(len(units.concepts))) if ci is None else [ci]
    every = tuple(range(len(PHRASE_SETS)))

    def sets_of(s: str) -> tuple[int, ...] | None:
        return every if s == "domain" else (PHRASE_SETS.index(s),) if s in PHRASE_SETS else None

    def column(kind, mask, fn):
        return Spec(kind, mask, lambda u, idx: fn(_restrict(u, kind, mask(u)))[idx].mean(-1),
                    lambda u: fn(_restrict(u, kind, mask(u))))

    if base.startswith("RER_") and sets_of(base[4:]) is not None:
        mask = _domain_mask(ci, sets_of(base[4:]))
        return Spec("domain", mask, lambda u, idx: _rer(_restrict(u, "domain", mask(u)), idx, groups))
    for prefix, side in (("erasure_rate_", "not_e"), ("concept_rate_", "e")):
        if base.startswith(prefix) and sets_of(base[len(prefix):]) is not None:
            mask = _domain_mask(ci, sets_of(base[len(prefix):]))
            return column("domain", mask, (lambda c: ~c["e"]) if side == "not_e" else (lambda c: c["e"]))
    if base == "concept_rate_original":
        return column("domain", _domain_mask(ci, every), lambda c: c["o"])
    if ci is not None and not base.startswith(("pre_ASR", "ASR", "post_ASR")):
        return None
    attrs = units.attributes
    everything = lambda u: np.ones(len(u.r_stratum), dtype=bool)  # noqa: E731
    for key, pick in (("retention_acc_all", tuple(ATTRIBUTES)), ("retention_acc", tuple(attrs))):
        for suffix, side in (("", "edited"), ("_original", "original")):
            if base == key + suffix:
                return column("retain", everything, lambda c, s=side, p=pick: _retain_hits(c, s, list(p)))
    if base == "retention_drop":
        return Spec("retain", everything, lambda u, idx: (
            _retain_hits(_restrict(u, "retain", everything(u)), "original", attrs)[idx].mean(-1)
            - _retain_hits(_restrict(u, "retain", everything(u)), "edited", attrs)[idx].mean(-1)))
    if base.startswith("neighbour_acc_"):
        value = base[len("neighbour_acc_"):]
        side = "original" if value.endswith("_original") else "edited"
        value = value.removesuffix("_original")
        attr = next((a for a in attrs if value in ATTRIBUTES[a]), None)
        if attr is None:
            return None
        mask = lambda u, a=attr, v=value: u.r_labels[a] == v  # noqa: E731
        return column("retain", mask, lambda c, a=attr, s=side: c[f"{s}/{a}"])
    if units.t_pre is None or not base.startswith(("pre_ASR", "ASR", "post_ASR")):
        return None
    tmask = (lambda u: np.ones(len(u.t_stratum), dtype=bool)) if ci is None else (lambda u: u.t_concept == ci)
    independent = units.independent

    def any_post(c, keys):
        return np.logical_or.reduce([c[f"post/{k}"] for k in keys]) if keys else np.zeros_like(c["pre"])

    if base == "pre_ASR":
        return column("red_team", tmask, lambda c: c["pre"])
    if base == "ASR":
        return column("red_team", tmask, lambda c: c["pre"] | any_post(c, independent))
    if base == "post_ASR":
        return column("red_team", tmask, lambda c: ~c["pre"] & any_post(c, independent))
    if base == "ASR_ring_max":
        rings = [k for k in units.t_post if k.startswith("ring_")]
        if not rings:
            return None

        def per_strength(u):
            c = _restrict(u, "red_team", tmask(u))
            return [c["pre"] | c[f"post/{k}"] for k in rings]

        def ring_max(u, idx):  # the attacker's best strength, chosen again in every resample
            return np.max([hits[idx].mean(-1) for hits in per_strength(u)], axis=0)

        def best_column(u):  # the pooled count at the best strength (Wilson)
            return max(per_strength(u), key=lambda hits: hits.mean())

        return Spec("red_team", tmask, ring_max, best_column)
    for prefix in ("post_ASR_", "ASR_"):
        if base.startswith(prefix) and base[len(prefix):] in units.t_post:
            k = base[len(prefix):]
            if prefix == "post_ASR_":
                return column("red_team", tmask, lambda c, k=k: c[f"post/{k}"])
            return column("red_team", tmask, lambda c, k=k: c["pre"] | c[f"post/{k}"])
    return None


def _strata(units: Units, kind: str, mask: np.ndarray) -> np.ndarray:
    return _restrict(units, kind, mask)["z"]


def stratified_interval(strata: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *,
                        seed: int = REPORT_SEED, n_resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over units resampled with replacement within
    each stratum (seed): :func:`sage_dist.eval.metrics.bootstrap_interval` with one unpaired sample of unit
    indices per stratum (scipy resamples each sample on its own), concatenated before ``statistic``.

    Args:
        strata: ``[M]`` stratum of each unit.
        statistic: unit indices ``[..., M]`` (int) -> value ``[...]``.
    Raises:
        ValueError: a stratum with fewer than 2 units.
    """
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]

    def stat(*picked, axis=-1):
        idx = np.concatenate([g[np.asarray(p, dtype=np.int64)] for g, p in zip(groups, picked)], axis=-1)
        return statistic(idx)

    samples = tuple(np.arange(len(g), dtype=np.float64) for g in groups)
    return bootstrap_interval(samples, stat, paired=False, seed=seed, n_resamples=n_resamples)


def pooled_cell(name: str, units: Units, expected: int) -> Cell | None:
    """``name`` pooled over the variant's seeds from its per-image outcomes (module docstring), or None when
    it is not such a metric."""
    if name in ("KID", "KID_original", "KID_delta"):
        return _kid_cell(name, units, expected)
    spec = metric_spec(name, units)
    if spec is None:
        return None
    mask = spec.mask(units)
    m = int(mask.sum())
    unit = "prompts" if spec.kind == "red_team" else "images"
    if m == 0:
        return Cell(value=float("nan"), n=0, unit=unit, seeds=len(units.seeds), expected=expected)
    if spec.rate is not None:
        hits = spec.rate(units)
        low, high = wilson_interval(int(hits.sum()), m)
        return Cell(value=float(hits.mean()), low=low, high=high, n=m, unit=unit, method="wilson",
                    seeds=len(units.seeds), expected=expected)
    value = float(spec.value(units, np.arange(m)))
    low = high = float("nan")
    if math.isfinite(value):
        low, high = stratified_interval(_strata(units, spec.kind, mask), lambda idx: spec.value(units, idx))
    return Cell(value=value, low=low, high=high, n=m, unit=unit, method="bootstrap", seeds=len(units.seeds),
                expected=expected)


# ---- KID pooled over seeds
def _kid_parts(units: Units, side: str):
    return [(f[side], f["reference"]) for f in units.features]


def _pooled_kid(pairs_a: list[tuple[np.ndarray, np.ndarray]], pairs_b: list[tuple[np.ndarray, np.ndarray]] | None,
                ) -> tuple[float, tuple[float, float], int]:
    """Mean over seeds of KID(a_s, reference_s) (minus the same for b when given, b's rows paired with a's), with
    a bootstrap over generated rows (within seed; a and b resampled together) and reference rows (one shared
    sample when every seed has the same references, else one per seed)."""
    shared = all(np.array_equal(pairs_a[0][1], ref) for _, ref in pairs_a)
    value = float(np.mean([kid(g, r) for g, r in pairs_a]))
    if pairs_b is not None:
        value -= float(np.mean([kid(g, r) for g, r in pairs_b]))
    kernels = []
    for s, (g, r) in enumerate(pairs_a):
        entry = [(_poly_kernel(g, g), _poly_kernel(r, r), _poly_kernel(g, r))]
        if pairs_b is not None:
            gb = pairs_b[s][0]
            entry.append((_poly_kernel(gb, gb), _poly_kernel(r, r), _poly_kernel(gb, r)))
        kernels.append(entry)
    sizes = [g.shape[0] for g, _ in pairs_a]
    ref_sizes = [r.shape[0] for _, r in pairs_a]
    num = len(pairs_a)

    def statistic(*idx, axis=-1):
        batched = np.ndim(idx[0]) > 1
        gen, refs = idx[:num], idx[num:]
        total = 0.0
        for s in range(num):
            cg = _counts(gen[s], sizes[s])
            cr = _counts(refs[0] if shared else refs[s], ref_sizes[s])
            kgg, krr, kgr = kernels[s][0]
            part = _kid_from_counts(cg, cr, kgg, krr, kgr)
            if pairs_b is not None:
                kbb, _, kbr = kernels[s][1]
                part = part - _kid_from_counts(cg, cr, kbb, krr, kbr)
            total = total + part
        out = total / num
        return out if batched else out[0]

    samples = tuple(np.arange(n, dtype=np.float64) for n in sizes)
    samples += (np.arange(ref_sizes[0], dtype=np.float64),) if shared else \
        tuple(np.arange(n, dtype=np.float64) for n in ref_sizes)
    low, high = bootstrap_interval(samples, statistic, paired=False, seed=REPORT_SEED, n_resamples=RESAMPLES)
    return value, (low, high), int(sum(sizes))


def _kid_cell(name: str, units: Units, expected: int) -> Cell | None:
    if units.features is None:
        return None
    if name == "KID_delta":
        value, (low, high), n = _pooled_kid(_kid_parts(units, "edited"), _kid_parts(units, "original"))
    else:
        value, (low, high), n = _pooled_kid(_kid_parts(units, "original" if name == "KID_original" else "edited"),
                                            None)
    return Cell(value=value, low=low, high=high, n=n, method="bootstrap", seeds=len(units.seeds), expected=expected)


# ---- per-trial numbers
def scalar_cell(values: list[float], expected: int, *, method: str = "t") -> Cell:
    """Mean over seeds of a per-trial number with the Student-t 95 % interval of the mean (``method="sd"``:
    mean ± standard deviation, for records without per-image outcomes)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Cell(value=float("nan"), method="missing", expected=expected)
    mean = float(x.mean())
    if method == "sd":
        return Cell(value=mean, sd=float(x.std(ddof=1)) if x.size > 1 else 0.0, n=x.size, unit="seeds",
                    method="sd", seeds=x.size, expected=expected)
    if x.size < 2:
        return Cell(value=mean, n=1, unit="seeds", method="single", seeds=1, expected=expected)
    sem = float(x.std(ddof=1) / np.sqrt(x.size))
    if sem == 0:
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(0.95, x.size - 1, loc=mean, scale=sem))
    return Cell(value=mean, low=low, high=high, n=x.size, unit="seeds", method="t", seeds=x.size, expected=expected)


# ---------------------------------------------------------------- a study's cells

@dataclass
class VariantRecords:
    """The records of one variant restricted to the study's seeds."""

    name: str
    ok: list[dict[str, Any]]
    failed: list[int]
    missing: list[int]
    units: Units | None
    """Per-image outcomes of the ok records that carry them (None: none do)."""


def variant_records(study: GridStudy, records: list[dict[str, Any]]) -> dict[str, VariantRecords]:
    """Per variant (study order): its ok records at the study's seeds, the seeds that failed and those with no
    record at all. A seed with several records (a re-run) keeps its ok one."""
    out = {}
    for v in study.variants:
        mine = [r for r in records if r["variant"] == v.name and r["seed"] in study.seeds]
        ok = {r["seed"]: r for r in mine if r.get("status") == "ok"}
        failed = sorted({r["seed"] for r in mine if r.get("status") != "ok"} - set(ok))
        missing = [s for s in study.seeds if s not in ok and s not in failed]
        with_outcomes = [r for r in ok.values() if r.get("outcomes")]
        units = Units.from_records(with_outcomes) if with_outcomes else None
        out[v.name] = VariantRecords(v.name, sorted(ok.values(), key=lambda r: r["seed"]), failed, missing, units)
    return out


def variant_cell(metric: str, vr: VariantRecords, expected: int) -> Cell:
    """The cell of ``metric`` for one variant (module docstring)."""
    if not vr.ok:
        return Cell(value=float("nan"), method="missing", expected=expected)
    if vr.units is not None:
        cell = pooled_cell(metric, vr.units, expected)
        if cell is not None:
            return cell
    counted = [r["metrics"] for r in vr.ok if f"{metric}_k" in r["metrics"] and f"{metric}_n" in r["metrics"]]
    if counted and len(counted) == len(vr.ok):  # a per-trial rate with its counts: pooled over seeds (Wilson)
        k, n = (int(sum(m[f"{metric}_{s}"] for m in counted)) for s in ("k", "n"))
        if n > 0:
            low, high = wilson_interval(k, n)
            return Cell(value=k / n, low=low, high=high, n=n, unit="images", method="wilson", seeds=len(counted),
                        expected=expected)
    values = [float(r["metrics"][metric]) for r in vr.ok if isinstance(r["metrics"].get(metric), (int, float))
              and math.isfinite(r["metrics"][metric])]
    if not values:
        return Cell(value=float("nan"), n=0, unit="seeds", method="single", seeds=0, expected=expected)
    return scalar_cell(values, expected, method="t" if vr.units is not None else "sd")


def study_cells(study: GridStudy, records: list[dict[str, Any]]) -> dict[str, dict[str, Cell]]:
    """``{metric: {variant: Cell}}`` for ``study.metrics``."""
    groups = variant_records(study, records)
    return {m: {name: variant_cell(m, vr, len(study.seeds)) for name, vr in groups.items()} for m in study.metrics}


def _seeds_column(vr: VariantRecords, expected: int) -> str:
    text = f"{len(vr.ok)} of {expected}"
    notes = []
    if vr.failed:
        notes.append(f"failed: {', '.join(map(str, vr.failed))}")
    if vr.missing:
        notes.append(f"missing: {', '.join(map(str, vr.missing))}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def study_table(study: GridStudy, records: list[dict[str, Any]]) -> str:
    """Markdown table: one row per variant (study order), the seeds finished (failed and missing ones named)
    and one column per ``study.metrics`` (:class:`Cell` text); transposed with ``study.table_rows="metrics"``."""
    groups = variant_records(study, records)
    cells = study_cells(study, records)
    if study.table_rows == "metrics":
        names = [v.name for v in study.variants]
        lines = ["| metric | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names)),
                 "| seeds ok | " + " | ".join(_seeds_column(groups[n], len(study.seeds)) for n in names) + " |"]
        lines += [f"| {m} | " + " | ".join(cells[m][n].text() for n in names) + " |" for m in study.metrics]
        return "\n".join(lines)
    lines = ["| variant | seeds ok | " + " | ".join(study.metrics) + " |", "|" + "---|" * (2 + len(study.metrics))]
    for v in study.variants:
        row = [cells[m][v.name].text() for m in study.metrics]
        lines.append(f"| {v.name} | {_seeds_column(groups[v.name], len(study.seeds))} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_seed_table(study: GridStudy, records: list[dict[str, Any]]) -> str:
    """Markdown table of each trial's own value (its seed's evaluation) of ``study.metrics``, seeds separated
    by " / " in seed order ("–" where a seed has no ok record)."""
    groups = variant_records(study, records)

    def values(name: str, m: str) -> str:
        by_seed = {r["seed"]: r for r in groups[name].ok}
        out = []
        for s in study.seeds:
            x = by_seed.get(s, {}).get("metrics", {}).get(m)
            out.append(f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "–")
        return " / ".join(out)

    names = [v.name for v in study.variants]
    if study.table_rows == "metrics":
        lines = ["| metric | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
        lines += [f"| {m} | " + " | ".join(values(n, m) for n in names) + " |" for m in study.metrics]
        return "\n".join(lines)
    lines = ["| variant | " + " | ".join(study.metrics) + " |", "|" + "---|" * (1 + len(study.metrics))]
    lines += [f"| {n} | " + " | ".join(values(n, m) for m in study.metrics) + " |" for n in names]
    return "\n".join(lines)


# ---------------------------------------------------------------- paired comparisons

@dataclass(frozen=True, kw_only=True)
class Comparison:
    """``metric(variant) - metric(reference)`` on the seeds both finished, with its paired interval."""

    metric: str
    variant: str
    reference: str
    variant_cell: Cell
    reference_cell: Cell
    delta: Cell
    seeds: tuple[int, ...]
    note: str = ""

    def verdict(self) -> str:
        """Whether the interval supports a difference, and which way (better or worse by the metric's
        direction)."""
        if self.note:
            return self.note
        if not math.isfinite(self.delta.value) or not math.isfinite(self.delta.low):
            return "no interval"
        if not self.delta.excludes_zero():
            return "no: the interval contains 0"
        higher = self.delta.value > 0
        if any(frag in self.metric for frag in NEUTRAL):
            return f"yes: {self.variant} {'higher' if higher else 'lower'}"
        better = higher != lower_is_better(self.metric)
        return f"yes: {self.variant} {'higher' if higher else 'lower'} ({'better' if better else 'worse'})"


def per_seed_differences(metric: str, a: VariantRecords, b: VariantRecords) -> list[float]:
    """``metric(a) - metric(b)`` of the trials' own metrics, one per seed both finished (seed order), where both
    have a finite number."""
    by_a = {r["seed"]: r["metrics"].get(metric) for r in a.ok}
    by_b = {r["seed"]: r["metrics"].get(metric) for r in b.ok}
    return [by_a[s] - by_b[s] for s in sorted(set(by_a) & set(by_b)) if isinstance(by_a[s], (int, float))
            and isinstance(by_b[s], (int, float)) and math.isfinite(by_a[s] - by_b[s])]


def _subset(seeds: list[int], records: list[dict[str, Any]]) -> Units:
    return Units.from_records([r for r in records if r["seed"] in seeds and r.get("outcomes")])


def paired_delta(metric: str, a: Units, b: Units) -> Cell | None:
    """``metric(a) - metric(b)`` for two variants' units on the same seeds and images (already checked), with
    a bootstrap interval resampling both variants' units of one prompt and noise together, stratified by seed;
    None when ``metric`` is not computed from per-image outcomes."""
    if metric in ("KID", "KID_original", "KID_delta"):
        if a.features is None or b.features is None:
            return None
        side = "original" if metric == "KID_original" else "edited"
        if metric == "KID_delta":  # (KID_a - KID_o) - (KID_b - KID_o) = KID_a - KID_b: the original cancels
            side = "edited"
        value, (low, high), n = _pooled_kid(_kid_parts(a, side), _kid_parts(b, side))
        return Cell(value=value, low=low, high=high, n=n, method="bootstrap", seeds=len(a.seeds),
                    expected=len(a.seeds))
    spec_a, spec_b = metric_spec(metric, a), metric_spec(metric, b)
    if spec_a is None or spec_b is None:
        return None
    mask_a, mask_b = spec_a.mask(a), spec_b.mask(b)
    if not np.array_equal(mask_a, mask_b):
        raise AssertionError(f"{metric}: paired units differ between variants")
    m = int(mask_a.sum())
    unit = "prompts" if spec_a.kind == "red_team" else "images"
    if m < 2:
        return Cell(value=float("nan"), n=m, unit=unit, method="bootstrap", seeds=len(a.seeds))

    def statistic(idx):
        return spec_a.value(a, idx) - spec_b.value(b, idx)

    value = float(statistic(np.arange(m)))
    low = high = float("nan")
    if math.isfinite(value):
        low, high = stratified_interval(_strata(a, spec_a.kind, mask_a), statistic)
    return Cell(value=value, low=low, high=high, n=m, unit=unit, method="bootstrap", seeds=len(a.seeds),
                expected=len(a.seeds))


def compare_variants(study: GridStudy, records: list[dict[str, Any]], variant: str, reference: str,
                     metrics: tuple[str, ...] | None = None) -> list[Comparison]:
    """Paired comparisons of ``variant`` against ``reference`` for each metric (default: ``compare_metrics``
    or ``metrics``), over the seeds both finished whose evaluations drew the same images (``plan_hash`` and
    red-team prompts and seeds equal). Per-trial numbers are compared by the mean over those seeds of the
    per-seed differences (Student-t interval)."""
    metrics = metrics or study.compare_metrics or study.metrics
    groups = variant_records(study, records)
    va, vb = groups[variant], groups[reference]
    common = sorted({r["seed"] for r in va.ok} & {r["seed"] for r in vb.ok})
    paired_seeds = [s for s in common if va.units is not None and vb.units is not None
                    and s in va.units.keys and va.units.keys[s] == vb.units.keys.get(s)]
    unpaired = [s for s in common if s not in paired_seeds and va.units is not None and vb.units is not None]
    ua = _subset(paired_seeds, va.ok) if paired_seeds else None
    ub = _subset(paired_seeds, vb.ok) if paired_seeds else None
    out = []
    for m in metrics:
        note = ""
        delta = None
        if ua is not None and ub is not None:
            delta = paired_delta(m, ua, ub)
        if delta is None:
            diffs = per_seed_differences(m, va, vb)
            delta = scalar_cell(diffs, len(study.seeds))
            if not diffs:
                note = "missing: no seed finished by both"
        out.append(Comparison(metric=m, variant=variant, reference=reference,
                              variant_cell=variant_cell(m, va, len(study.seeds)),
                              reference_cell=variant_cell(m, vb, len(study.seeds)), delta=delta,
                              seeds=tuple(paired_seeds or common), note=note))
    if unpaired:  # e.g. records from runs at different fidelities in one folder
        log.warning("%s vs %s: seeds %s evaluated different images; left out of the paired comparisons",
                    variant, reference, unpaired)
    return out


def _delta_text(cell: Cell) -> str:
    if not math.isfinite(cell.value):
        return "n/a"
    if math.isfinite(cell.low) and math.isfinite(cell.high):
        return f"{cell.value:+.3g} [{cell.low:+.3g}, {cell.high:+.3g}]"
    return f"{cell.value:+.3g} (no interval)"


def comparison_table(comparisons: list[Comparison]) -> str:
    """Markdown table of one variant's paired comparisons against the reference (one row per metric)."""
    if not comparisons:
        return ""
    c0 = comparisons[0]
    lines = [f"| metric | {c0.variant} | {c0.reference} | Δ = {c0.variant} − {c0.reference} [95 % CI] | n | "
             "does the interval support a difference? |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        n = f"{c.delta.n} {c.delta.unit}" if c.delta.n else "–"
        lines.append(f"| {c.metric} | {c.variant_cell.text()} | {c.reference_cell.text()} | {_delta_text(c.delta)} "
                     f"| {n} | {c.verdict()} |")
    return "\n".join(lines)


def comparison_summary_table(study: GridStudy, records: list[dict[str, Any]]) -> str:
    """Markdown table of every variant's paired differences from ``study.reference_variant``: one row per
    metric, one column per other variant, each cell ``Δ [low, high]`` and whether the interval supports a
    difference ("**yes**", better or worse by the metric's direction) or not ("no"); "" without a reference."""
    ref = study.reference_variant
    if not ref:
        return ""
    others = [v.name for v in study.variants if v.name != ref]
    comps = {name: {c.metric: c for c in compare_variants(study, records, name, ref)} for name in others}
    metrics = study.compare_metrics or study.metrics
    lines = ["| metric | " + " | ".join(f"{n} − {ref}" for n in others) + " |", "|" + "---|" * (1 + len(others))]
    for m in metrics:
        cells = []
        for n in others:
            c = comps[n][m]
            verdict = c.verdict()
            if verdict.startswith("yes"):
                mark = "**yes, " + ("better" if "(better)" in verdict else "worse" if "(worse)" in verdict
                                    else verdict.split()[-1]) + "**"
            else:
                mark = "no" if verdict.startswith("no:") else ""
            cells.append(f"{_delta_text(c.delta)} {mark}".strip())
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_section(study: GridStudy, records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: every variant against ``study.reference_variant`` (nothing when the study has none)."""
    ref = study.reference_variant
    if not ref:
        return []
    lines = [f"### Paired comparisons against `{ref}`", "",
             "Same prompts and initial noise per seed (the evaluation's noise seed is the trial seed); each Δ's "
             "interval resamples the two variants' images of one prompt and noise together, stratified by seed. "
             "Per-trial numbers (costs) compare the per-seed differences (Student-t over seeds). \"yes\": the 95 % "
             "interval of Δ excludes 0.", "", comparison_summary_table(study, records), ""]
    if len(study.seeds) > 1:
        lines += ["Across training seeds (the mean of the per-seed Δ of the trials' own metrics, Student-t 95 % "
                  "interval over the seeds both finished; `+k/−k`: seeds whose Δ is positive / negative). The "
                  "table above resamples images given the trained models; this one asks whether a difference "
                  "holds from one trained model to the next.", "", seed_level_summary_table(study, records), ""]
    for v in study.variants:
        if v.name == ref:
            continue
        comps = compare_variants(study, records, v.name, ref)
        seeds = comps[0].seeds if comps else ()
        lines += [f"**{v.name} vs {ref}** (paired seeds: {', '.join(map(str, seeds)) or 'none'}; the study's: "
                  f"{', '.join(map(str, study.seeds))}):", "", comparison_table(comps), ""]
    return lines


# ---------------------------------------------------------------- findings, plots, sections

def findings(study: GridStudy, records: list[dict[str, Any]]) -> list[str]:
    """One line per table metric: best and worst variant with their cells (direction from the metric name)."""
    out = []
    cells = study_cells(study, records)
    for m in study.metrics:
        stats = {k: c for k, c in cells[m].items() if math.isfinite(c.value)}
        if len(stats) < 2:
            continue
        order = sorted(stats, key=lambda k: stats[k].value, reverse=not lower_is_better(m))
        best, worst = order[0], order[-1]
        if stats[best].value == stats[worst].value:
            out.append(f"- **{m}**: the same for every variant ({stats[best].text()}).")
            continue
        if any(frag in m for frag in NEUTRAL):
            hi, lo = (best, worst) if stats[best].value > stats[worst].value else (worst, best)
            out.append(f"- **{m}**: highest `{hi}` {stats[hi].text()}, lowest `{lo}` {stats[lo].text()}.")
            continue
        out.append(f"- **{m}** ({'lower' if lower_is_better(m) else 'higher'} is better): best `{best}` "
                   f"{stats[best].text()}, worst `{worst}` {stats[worst].text()}.")
    return out


def _part_verdict(part: Comparison, retention: Comparison, reference_better_when_lower: bool) -> str:
    """One part of a claim for one baseline: "supported", "contradicted", "not separable" (naming the one that
    retains more when retention separates them: equal on this part at higher retention is the better point of
    the trade-off) or "trade-off"."""
    def sign(c: Comparison) -> int:  # +1 / -1: the interval of (variant - reference) excludes 0 that way; 0: not
        return 0 if not c.delta.excludes_zero() else (1 if c.delta.value > 0 else -1)

    baseline_better = sign(part) * (-1 if reference_better_when_lower else 1)  # +1: the baseline beats the reference
    baseline_retains = sign(retention)
    if baseline_better < 0 and baseline_retains <= 0:
        return "supported"
    if baseline_better > 0 and baseline_retains >= 0:
        return "contradicted"
    if baseline_better == 0:
        if baseline_retains == 0:
            return "not separable"
        return f"not separable; `{part.reference if baseline_retains < 0 else part.variant}` retains more"
    return "trade-off (unequal retention)"


def claim_verdicts(study: GridStudy, records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines judging ``study.claim`` against every other variant from paired intervals: erasure at equal
    retention, and robustness (each "supported", "contradicted", "not separable at this power", or
    "trade-off": the two differ on retention the other way, so the claim's "at equal retention" cannot be
    judged); [] without a claim or a reference."""
    claim, ref = study.claim, study.reference_variant
    if claim is None or not ref:
        return []
    lines = [f"**The claim** (`{ref}` against each baseline): {claim.text}", "",
             f"| baseline | Δ {claim.erasure} | Δ {claim.retention} | Δ {claim.robustness} | erasure at equal "
             "retention | robustness | verdict |", "|---|---|---|---|---|---|---|"]
    seeds: set[int] = set()
    for v in study.variants:
        if v.name == ref:
            continue
        comps = {c.metric: c for c in compare_variants(study, records, v.name, ref,
                                                      (claim.erasure, claim.retention, claim.robustness))}
        erase, keep, robust = comps[claim.erasure], comps[claim.retention], comps[claim.robustness]
        seeds |= set(erase.seeds)
        if not all(math.isfinite(c.delta.value) and math.isfinite(c.delta.low) for c in (erase, keep, robust)):
            lines.append(f"| {v.name} | | | | | | missing: no paired seeds |")
            continue
        parts = [_part_verdict(erase, keep, reference_better_when_lower=False),
                 _part_verdict(robust, keep, reference_better_when_lower=True)]
        if all(p == "supported" for p in parts):
            overall = "**supported**"
        elif "contradicted" in parts:
            overall = "**contradicted**"
        elif any(p.startswith("trade-off") for p in parts):
            overall = "not judged at equal retention (trade-off)"
        elif keep.delta.excludes_zero():
            overall = (f"not separable at this power; `{ref if keep.delta.value < 0 else v.name}` retains more "
                       f"({claim.retention})")
        else:
            overall = "not separable at this power"
        lines.append(f"| {v.name} | {_delta_text(erase.delta)} | {_delta_text(keep.delta)} | "
                     f"{_delta_text(robust.delta)} | {parts[0]} | {parts[1]} | {overall} |")
    lines += ["", f"Δ = baseline − `{ref}`, paired on identical noise over the seeds both finished "
              f"({', '.join(map(str, sorted(seeds))) or 'none'}), 95 % intervals. A part is supported when `{ref}` is better "
              "and does not retain less, contradicted when the baseline is better and does not retain less, not "
              "separable when the interval contains 0 (with the one that retains more named, where retention "
              "separates them), and a trade-off when the better one retains less.", ""]
    return lines + seed_level_claim_table(study, records)


def seed_level_claim_table(study: GridStudy, records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the claim's three differences (baseline − reference) across training seeds, each the
    mean of the per-seed differences of the trials' own metrics with a Student-t 95 % interval over the seeds
    both finished, and how many seeds point each way. The claim table's intervals resample images given the
    trained models; this one asks whether the direction holds from one trained model to the next. [] without a
    claim or a reference."""
    claim, ref = study.claim, study.reference_variant
    if claim is None or not ref:
        return []
    groups = variant_records(study, records)
    metrics = (claim.erasure, claim.retention, claim.robustness)
    lines = ["Across training seeds (mean of the per-seed Δ, Student-t interval over the seeds; `+k/−k`: seeds "
             "whose Δ is positive / negative):", "",
             "| baseline | seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for v in study.variants:
        if v.name == ref:
            continue
        common = {r["seed"] for r in groups[v.name].ok} & {r["seed"] for r in groups[ref].ok}
        cells = [seed_level_delta_text(m, groups[v.name], groups[ref], len(study.seeds)) for m in metrics]
        lines.append(f"| {v.name} | {len(common)} | " + " | ".join(cells) + " |")
    return lines + [""]


def seed_level_delta_text(metric: str, a: VariantRecords, b: VariantRecords, expected: int) -> str:
    """``Δ [low, high] (+k/−k)``: the mean over the seeds both finished of ``metric``'s per-seed difference
    ``a − b`` (the trials' own metrics), its Student-t 95 % interval over those seeds, and how many seeds' Δ is
    positive / negative; "(1 seed, no interval)" for one seed, "missing" for none."""
    diffs = per_seed_differences(metric, a, b)
    cell = scalar_cell(diffs, expected)
    text = _delta_text(cell) if cell.method == "t" else (f"{cell.value:+.3g} (1 seed, no interval)"
                                                          if diffs else "missing")
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return f"{text} (+{up}/−{down})" if diffs else text


def seed_level_summary_table(study: GridStudy, records: list[dict[str, Any]]) -> str:
    """Markdown table of every variant's differences from ``study.reference_variant`` across training seeds:
    one row per compared metric, one column per other variant, each cell :func:`seed_level_delta_text`;
    "" without a reference."""
    ref = study.reference_variant
    if not ref:
        return ""
    groups = variant_records(study, records)
    others = [v.name for v in study.variants if v.name != ref]
    lines = ["| metric | " + " | ".join(f"{n} − {ref}" for n in others) + " |", "|" + "---|" * (1 + len(others))]
    for m in study.compare_metrics or study.metrics:
        lines.append(f"| {m} | " + " | ".join(seed_level_delta_text(m, groups[n], groups[ref], len(study.seeds))
                                              for n in others) + " |")
    return "\n".join(lines)


def _errors(cell: Cell) -> tuple[float, float]:
    if cell.method == "sd":
        return cell.sd, cell.sd
    if math.isfinite(cell.low) and math.isfinite(cell.high):
        return max(cell.value - cell.low, 0.0), max(cell.high - cell.value, 0.0)
    return 0.0, 0.0


def plot_study(study: GridStudy, records: list[dict[str, Any]], plot_dir: str | Path) -> list[Path]:
    """PNG plots: each ``plot_metrics`` entry against the variants (lines per group over ``x`` when every variant
    has an ``x``, else bars), error bars the cells' 95 % intervals (sd for records without per-image outcomes),
    and each ``curve_metrics`` entry against the step (mean over seeds per variant). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if study.plot_metrics:
        groups_ = variant_records(study, records)
        fig, axes = plt.subplots(1, len(study.plot_metrics), figsize=(4.2 * len(study.plot_metrics), 3.4), squeeze=False)
        for ax, m in zip(axes[0], study.plot_metrics):
            cells = {n: variant_cell(m, vr, len(study.seeds)) for n, vr in groups_.items()}
            cells = {n: c for n, c in cells.items() if math.isfinite(c.value)}
            if all(v.x is not None for v in study.variants):
                groups: dict[str, list] = {}
                for v in study.variants:
                    if v.name in cells:
                        groups.setdefault(v.group or v.name, []).append((v.x, cells[v.name]))
                for g, pts in groups.items():
                    pts.sort(key=lambda p: p[0])
                    err = np.array([_errors(c) for _, c in pts]).T
                    ax.errorbar([p[0] for p in pts], [c.value for _, c in pts], yerr=err, marker="o", capsize=3,
                                label=g)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(study.x_label or "x")
                ax.legend(fontsize=8)
            else:
                names = [v.name for v in study.variants if v.name in cells]
                err = np.array([_errors(cells[n]) for n in names]).T if names else None
                ax.bar(range(len(names)), [cells[n].value for n in names], yerr=err, capsize=3)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{m} (95 % CI)", fontsize=10)
        fig.suptitle(study.name, fontsize=11)
        fig.tight_layout()
        path = plot_dir / f"{study.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    for m in study.curve_metrics:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        drawn = False
        for v in study.variants:
            curves = [r["curves"][m] for r in _ok(records) if r["variant"] == v.name and m in r.get("curves", {})]
            if not curves:
                continue
            steps = sorted({s for c in curves for s, _ in c})
            means = [np.nanmean([val for c in curves for s2, val in c if s2 == s]) for s in steps]
            ax.plot(steps, means, marker=".", label=v.name)
            drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel(m)
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = plot_dir / f"{study.name}_{m}.png"
            fig.savefig(path, dpi=110)
            paths.append(path)
        plt.close(fig)
    return paths


HOW_TO_READ = ("How to read the cells: `value ± h (n)` is the value pooled over the seeds with the half-width h "
               "of its 95 % interval and the number of images (or attacked prompts) n behind it; `value [lo, hi] "
               "(n)` gives the bounds where the interval is lopsided (rates near 0 or 1). Rates: Wilson interval "
               "of the pooled counts; RER and retention_drop: paired bootstrap over images stratified by seed; "
               "KID: mean of the per-seed KIDs, bootstrap over generated images and renders; `(k seeds)`: a "
               "per-trial number (cost), mean over seeds with a Student-t interval; `± s sd`: records without "
               "per-image outcomes, mean ± standard deviation over seeds. `i of k seeds`: only i of the study's "
               "k seeds finished. The intervals are over images given the trained models; the per-seed table "
               "shows how much training seeds differ.")


def study_section(study: GridStudy, records: list[dict[str, Any]], plot_dir: str | Path, md_dir: str | Path) -> str:
    """The Markdown section of one study (question, hypothesis, table, paired comparisons, per-seed values,
    findings, plots)."""
    lines = [f"## {study.name}: {study.question}", ""]
    if study.hypothesis:
        lines += [f"*Hypothesis:* {study.hypothesis}", ""]
    if study.notes:
        lines += [study.notes, ""]
    groups = variant_records(study, records)
    ok = sum(len(vr.ok) for vr in groups.values())
    expected = len(study.variants) * len(study.seeds)
    pooled = any(vr.units is not None for vr in groups.values())
    if not ok:
        how = "no trial finished, so every cell reads missing."
    elif pooled:
        how = "pooled over seeds with 95 % intervals."
    else:
        how = "mean ± sd over seeds (these records carry no per-image outcomes)."
    lines += [f"{ok} of {expected} trials finished ({len(study.variants)} variants x seeds "
              f"{', '.join(map(str, study.seeds))}); " + how, "",
              study_table(study, records), ""]
    lines += claim_verdicts(study, records)
    lines += comparisons_section(study, records)
    if len(study.seeds) > 1:
        lines += ["Per seed (each trial's own evaluation; seeds " + " / ".join(map(str, study.seeds)) + "):", "",
                  per_seed_table(study, records), ""]
    found = findings(study, records)
    if found:
        lines += ["Findings:", "", *found, ""]
    failed = [r for r in records if r.get("status") != "ok"]
    for r in failed[:5]:
        lines.append(f"- failed `{r['variant']}` seed {r['seed']}: {r.get('error', '')[:300]}")
    if failed:
        lines.append("")
    for path in plot_study(study, records, plot_dir):
        rel = Path(path).resolve().relative_to(Path(md_dir).resolve()) if Path(path).resolve().is_relative_to(
            Path(md_dir).resolve()) else Path(path)
        lines += [f"![{path.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def write_report(studies: list[GridStudy], records: dict[str, list[dict[str, Any]]], out_md: str | Path, *,
                 title: str = "Open questions", preamble: str = "") -> Path:
    """Write the Markdown report (and its plots under ``<out_md folder>/<out_md stem>_plots/``)."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out_md.parent / f"{out_md.stem}_plots"
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble, ""]
    parts += [HOW_TO_READ, ""]
    for study in studies:
        parts.append(study_section(study, records.get(study.name, []), plot_dir, out_md.parent))
    out_md.write_text("\n".join(parts) + "\n")
    return out_md
