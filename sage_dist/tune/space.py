"""Search spaces for SAGE's hyper-parameters (Optuna define-by-run), checked before Ray starts.

:class:`SageSpace` holds the bounds; :meth:`SageSpace.suggest` is the define-by-run function body. Parameter
names are the config's dotted keys, so a trial's suggestions go straight into ``StudyConfig.replace_flat``.

Why these ranges (docs/METHOD.md):

* ``retain.retain_loss_weight`` γt, log-uniform 0.1..10: the spec reads γt = 0.4 for nudity and 3.0 for style
  (§1.7, [B]) and AdvUnlearn uses 0.3 / 0.5 (§1.7, [A]); a log range one decade around both covers the two
  tasks and lets the search find "almost no retention" and "retention dominates".
* ``attack.attack_steps`` J, 1..30: J = 30 is the SAGE and AdvUnlearn value (§1.6, §1.8); the inside-out
  attack starts inside the concept, so far fewer steps may suffice, which is the cost the search can save.
* ``retain.top_k`` k, 1..min(16, b_retain): k = 4 of b = 32 (§1.7, [B]); AdvUnlearn effectively uses all 5
  of 5. Must stay <= ``retain.retain_batch_size`` (the config rejects k > b).
* ``erase.warmup_steps``, 0..half the run: 200 of 1000 iterations (§1.5, §1.8), i.e. a fifth of the run; the
  range spans "attack from the start" to "attack only in the second half". Must stay <= ``optim.num_steps``.
* optional ``optim.lr``, log 3e-6..1e-4 on SD: ESD 2023 and AdvUnlearn use 1e-5, ESD 2025 5e-5 (§1.8). The
  bundled world's encoder is tiny and its runs short (48 steps): there the main job searches 2e-4..3e-3, which
  spans "the encoder barely moves" (no retention loss, little robust erasure) to "it moves far" (robust
  erasure near 1 at a retention cost; ``reports/main_job.md``).
* optional ``erase.negative_guidance`` η, 1..2: 1.0 (ESD 2023, AdvUnlearn) and 2.0 (ESD 2025) (§1.4, §1.8).

Bad bounds raise ``ValueError`` naming the bound: in :class:`SageSpace` (empty or non-positive ranges) and in
:func:`validate_search_space` (a bound the study's configuration rejects, e.g. top_k above b_retain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sage_dist.config import StudyConfig

SearchSpaceFn = Callable[[Any], dict[str, Any] | None]
"""A define-by-run function: takes an ``optuna.Trial``, calls ``trial.suggest_*`` with dotted config keys."""

LABELS = {"retain.retain_loss_weight": "γt", "attack.attack_steps": "J", "retain.top_k": "top-k",
          "erase.warmup_steps": "warm-up", "optim.lr": "lr", "erase.negative_guidance": "η"}
"""Short names of the searched keys (tables, plots)."""


def _check_range(name: str, bounds: tuple[float, float] | None, *, positive: bool = False,
                 integer: bool = False) -> None:
    if bounds is None:
        return
    if len(bounds) != 2:
        raise ValueError(f"search space {name}={bounds!r}: give (low, high)")
    low, high = bounds
    if integer and (int(low) != low or int(high) != high):
        raise ValueError(f"search space {name}={bounds!r}: bounds must be integers")
    if low > high:
        raise ValueError(f"search space {name}: low={low} > high={high}, the range is empty; swap or widen it")
    if positive and low <= 0:
        raise ValueError(f"search space {name}: low={low} must be > 0 (the range is log-uniform)")


@dataclass(frozen=True, kw_only=True)
class SageSpace:
    """Bounds of SAGE's search space (module docstring gives the spec reasons). ``None`` fixes a parameter at
    the study's configured value. Equal low and high also fix it."""

    retain_loss_weight: tuple[float, float] | None = (0.1, 10.0)
    """γt, log-uniform."""
    attack_steps: tuple[int, int] | None = (1, 30)
    """J, integer."""
    top_k: tuple[int, int] | None = (1, 16)
    """k, integer; the high end must not exceed ``retain.retain_batch_size`` (checked before Ray starts)."""
    warmup_steps: tuple[int, int] | None = (0, 500)
    """Warm-up iterations, integer; the high end must not exceed ``optim.num_steps`` (checked before Ray
    starts); half the run is the range the spec motivates."""
    lr: tuple[float, float] | None = None
    """Learning rate, log-uniform (optional; e.g. (3e-6, 1e-4))."""
    negative_guidance: tuple[float, float] | None = None
    """η (optional; e.g. (1.0, 2.0))."""

    def __post_init__(self) -> None:
        _check_range("retain_loss_weight (γt)", self.retain_loss_weight, positive=True)
        _check_range("attack_steps (J)", self.attack_steps, integer=True)
        _check_range("top_k", self.top_k, integer=True)
        _check_range("warmup_steps", self.warmup_steps, integer=True)
        _check_range("lr", self.lr, positive=True)
        _check_range("negative_guidance (η)", self.negative_guidance)

    def suggest(self, trial) -> dict[str, Any]:
        """Define-by-run body: one ``trial.suggest_*`` per searched parameter; returns fixed ones (none)."""
        if self.retain_loss_weight:
            trial.suggest_float("retain.retain_loss_weight", *self.retain_loss_weight, log=True)
        if self.attack_steps:
            trial.suggest_int("attack.attack_steps", *self.attack_steps)
        if self.top_k:
            trial.suggest_int("retain.top_k", *self.top_k)
        if self.warmup_steps:
            trial.suggest_int("erase.warmup_steps", *self.warmup_steps)
        if self.lr:
            trial.suggest_float("optim.lr", *self.lr, log=True)
        if self.negative_guidance:
            trial.suggest_float("erase.negative_guidance", *self.negative_guidance)
        return {}


def space_distributions(search_space: SearchSpaceFn) -> dict[str, Any]:
    """The Optuna distributions the define-by-run function declares (one dry run on an in-memory study).

    Raises:
        ValueError: the function declares an empty or invalid range (Optuna's message, with the parameter).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study().ask()
    try:
        search_space(trial)
    except ValueError as err:
        raise ValueError(f"search space is invalid: {err}") from err
    return dict(trial.distributions)


def _bounds(dist) -> list[Any]:
    if hasattr(dist, "choices"):
        if not dist.choices:
            raise ValueError("search space: a categorical parameter has no choices")
        return list(dist.choices)
    return [dist.low, dist.high]


def validate_search_space(search_space: SearchSpaceFn, base: StudyConfig) -> dict[str, Any]:
    """Check, before Ray starts, that every bound of ``search_space`` gives a valid ``StudyConfig``.

    Each bound alone, all low bounds together and all high bounds together are applied to ``base``.

    Returns:
        The distributions (name -> Optuna distribution).
    Raises:
        ValueError: naming the parameter and bound the configuration rejects, with the config's reason.
    """
    dists = space_distributions(search_space)
    if not dists:
        raise ValueError("search space declares no parameters; suggest at least one (e.g. retain.retain_loss_weight)")
    bounds = {name: _bounds(d) for name, d in dists.items()}
    for name, values in bounds.items():
        for value in values:
            try:
                base.replace_flat({name: value})
            except ValueError as err:
                raise ValueError(f"search space bound {name}={value} is rejected by the study config: {err}") from err
    for pick in (0, -1):
        combo = {name: values[pick] for name, values in bounds.items()}
        try:
            base.replace_flat(combo)
        except ValueError as err:
            which = "low" if pick == 0 else "high"
            raise ValueError(f"search space: all {which} bounds together {combo} are rejected by the study config: "
                             f"{err}") from err
    return dists


def fixed_trial_distributions(search_space: SearchSpaceFn, params: dict[str, Any]) -> dict[str, Any]:
    """Distributions of ``search_space`` when it is replayed with ``params`` (for rebuilding an Optuna study
    from finished trials)."""
    import optuna

    trial = optuna.trial.FixedTrial(params)
    search_space(trial)
    return dict(trial.distributions)
