"""Typed, self-validating configuration for sage_dist.

One frozen dataclass per concern, composed into :class:`StudyConfig` . Every field
has a default; the default is the SAGE spec's default (docs/METHOD.md §1.8) wherever the spec
gives one, and every detail the spec marks unknown is a field whose default is the spec's stated default
and whose alternative reading is another allowed value.

Values are checked in ``__post_init__``, so a bad value fails before any model is loaded: first every
field against its annotation (:func:`check_field_types`: ``float`` fields finite real numbers, ``int``
fields integers, ``bool``, ``str``, ``Literal`` and ``tuple[...]`` fields of their type), then each field's
range, with a message naming ``section.field`` and what is allowed. Checks that need files (the model folder, the retain set's size) live in
:func:`sage_dist.train.validate.validate_inputs`, which the entry points call before loading a model.

Overrides use dotted paths: ``StudyConfig().override(["--erase.negative_guidance=2.0"])``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

Method = Literal["sage", "esd", "advunlearn", "esd-x"]
Dtype = Literal["auto", "float32", "float16", "bfloat16", "float64"]


MAX_SEED = 2**32 - 1
"""Largest ``optim.seed``: per-rank generators are seeded with ``seed * 1_000_003 + rank``, which must stay
below torch's 2**64 limit."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_problem(value: Any, ftype: Any) -> str | None:
    """What is wrong with ``value`` for annotation ``ftype`` (None: nothing)."""
    origin = get_origin(ftype)
    if origin is Literal:
        return None if value in get_args(ftype) else f"allowed values are {list(get_args(ftype))}"
    if origin is tuple:
        if not isinstance(value, tuple):
            return "expected a tuple (e.g. (0, 1)); a string or list is not one"
        item_type = get_args(ftype)[0]
        for item in value:
            problem = _type_problem(item, item_type)
            if problem is not None:
                return f"item {item!r}: {problem}"
        return None
    if ftype is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if ftype is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "expected an integer"
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "expected a number"
        return None if math.isfinite(value) else "must be a finite number (not nan or inf)"
    if ftype is str:
        return None if isinstance(value, str) else "expected a string"
    raise AssertionError(f"unsupported config field type {ftype}")


def check_field_types(section: str, obj: Any) -> None:
    """Check every field of config dataclass ``obj`` against its annotation (see the module docstring).

    Raises:
        ValueError: ``"{section}.{field}={value!r}: {what is allowed}"`` for the first field that does not fit.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem is not None:
            raise ValueError(f"{section}.{f.name}={value!r}: {problem}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model_id: str = "world"
    """Model to erase from: "world" / "world-xl" (the bundled world, default), "tiny-sd" / "tiny-sdxl"
    (random tiny models built from configs, for tests), a Hub id such as "CompVis/stable-diffusion-v1-4",
    or a local diffusers folder."""
    train_encoders: tuple[int, ...] = (0,)
    """Which text encoders are trained: (0,) the first (the only one in SD 1.x/2.x); SDXL also (1,) or (0, 1)."""
    trainable: Literal["full", "attn", "mlp"] = "full"
    """Parameters trained inside the chosen encoder blocks (AdvUnlearn's text_encoder_full is "full";
    docs/METHOD.md "Models and trained weights"). Token and position embeddings are always frozen."""
    trainable_layers: tuple[int, ...] = ()
    """Encoder block indices to train; empty means all blocks (docs/METHOD.md "Models and trained weights"). The final LayerNorm is trained
    whenever "full" is chosen."""
    frozen_dtype: Dtype = "auto"
    """dtype of the frozen parts (UNet, VAE, original encoder): "auto" is bfloat16 on CUDA and float32 on the
    CPU. The trainable encoder (or ESD-x's UNet copy) is in ``train_dtype``."""
    train_dtype: Literal["float32", "float64"] = "float32"
    """dtype of the trainable copies, the attack's token embeddings, the latents and every loss. "float64" (with
    ``frozen_dtype="float64"``) is for reference runs whose numbers must agree across CPUs to many digits, such
    as the golden loss trace (fp32 rounding differs between CPU kernels and the optimiser amplifies it)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run; "auto" picks CUDA when available."""
    student_chunk_size: int = 0
    """Rows (erase + selected retain prompts) per UNet forward+backward of the student pass; the loss is split
    by rows and the text encoder is back-propagated once, so any value gives the same gradients (up to float
    summation order) and only peak memory changes. 0 = "auto": 1 for SDXL-size UNets (>= 2B parameters), 2 for
    SD-size (>= 100M), all rows in one pass for smaller models (the world, tiny test models)."""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute the frozen UNet's activations in the backward of the student pass (diffusers'
    ``enable_gradient_checkpointing``; exact, ~30% slower, much less memory). "auto" = on for SDXL-size UNets."""

    def __post_init__(self) -> None:
        check_field_types("model", self)
        _require(bool(self.model_id.strip()), "model.model_id is empty: give a Hub id, a local folder or 'world'.")
        _require(len(self.train_encoders) >= 1, "model.train_encoders must name at least one encoder, e.g. (0,).")
        _require(all(i in (0, 1) for i in self.train_encoders),
                 f"model.train_encoders={self.train_encoders}: allowed indices are 0 and 1 (SDXL has two encoders).")
        _require(len(set(self.train_encoders)) == len(self.train_encoders),
                 f"model.train_encoders={self.train_encoders} repeats an index.")
        _require(all(i >= 0 for i in self.trainable_layers),
                 f"model.trainable_layers={self.trainable_layers}: layer indices must be >= 0.")
        _require(self.student_chunk_size >= 0,
                 f"model.student_chunk_size={self.student_chunk_size}: must be >= 0 (0 = auto).")


@dataclass(frozen=True, kw_only=True)
class EraseConfig:
    method: Method = "sage"
    """"sage" (docs/METHOD.md "What SAGE is"), "esd" (erase loss on the word only, text encoder; no attack, no retention),
    "advunlearn" (outside-in prefix-token attack through the UNet, noise retention on all retain prompts), or
    "esd-x" (ESD's cross-attention variant: the same erase loss, but the UNet's cross-attention (attn2)
    weights are trained and the text encoder stays frozen; the frozen-UNet study's baseline, reports/open_questions.md)."""
    erase_concept: tuple[str, ...] = ("triangle",)
    """Concept(s) to remove, e.g. ("nudity",) or ("Van Gogh", "Kilian Eng"). Several concepts are erased
    jointly, each with its own attack state (docs/METHOD.md "Several concepts")."""
    negative_guidance: float = 1.0
    """η in target = e_∅ − η (e_c − e_∅) (docs/METHOD.md "Self-erasure"; ESD 2023 and AdvUnlearn use 1.0, ESD 2025 uses 2.0)."""
    start_guidance: float = 3.0
    """Classifier-free guidance scale of the frozen DDIM rollout that produces z_t (docs/METHOD.md "Self-erasure")."""
    ddim_steps: int = 50
    """Steps of the DDIM schedule the rollout index i is drawn from (docs/METHOD.md "Self-erasure")."""
    warmup_steps: int = 200
    """Iterations that erase the plain concept word before the first attack (docs/METHOD.md "Warm-up")."""
    steps_per_cycle: int = 1
    """Training steps per attack (cycle length, docs/METHOD.md "Self-check"; AdvUnlearn's adv_prompt_update_step)."""
    multi_concept: Literal["round_robin", "sum"] = "round_robin"
    """With several concepts: erase one per step in turn (ESD/AdvUnlearn style), or all of them every step."""
    log_interference: bool = False
    """With several concepts and multi_concept="sum": log the mean pairwise cosine between the per-concept
    erase-loss gradients on the trainable parameters ("interference_cos", one extra backward per concept)."""
    rollout_cache: bool = False
    """Draw z_t from a bank of ``rollout_bank_size`` full frozen-model DDIM trajectories per prompt instead
    of a fresh rollout every step . An approximation: z_t then comes from a finite set of start
    noises. False recomputes the rollout every step exactly as ESD and AdvUnlearn do."""
    rollout_bank_size: int = 4
    """Start noises (trajectories) kept per prompt when ``rollout_cache``; each is run only as deep as asked."""

    def __post_init__(self) -> None:
        check_field_types("erase", self)
        _require(len(self.erase_concept) >= 1, "erase.erase_concept is empty: name at least one concept to erase.")
        for c in self.erase_concept:
            _require(isinstance(c, str) and bool(c.strip()),
                     f"erase.erase_concept={self.erase_concept!r} contains an empty concept; remove it.")
        _require(len(set(self.erase_concept)) == len(self.erase_concept),
                 f"erase.erase_concept={self.erase_concept!r} repeats a concept.")
        _require(self.negative_guidance > 0, f"erase.negative_guidance={self.negative_guidance}: must be > 0.")
        _require(self.start_guidance >= 0, f"erase.start_guidance={self.start_guidance}: must be >= 0.")
        _require(2 <= self.ddim_steps <= 1000, f"erase.ddim_steps={self.ddim_steps}: allowed 2..1000.")
        _require(self.warmup_steps >= 0, f"erase.warmup_steps={self.warmup_steps}: must be >= 0.")
        _require(self.steps_per_cycle >= 1, f"erase.steps_per_cycle={self.steps_per_cycle}: must be >= 1.")
        _require(self.rollout_bank_size >= 1, f"erase.rollout_bank_size={self.rollout_bank_size}: must be >= 1.")


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    attack_steps: int = 30
    """J: optimiser steps of one attack (docs/METHOD.md "Self-check")."""
    attack_lr: float = 1e-3
    """Learning rate of the attack optimiser (AdvUnlearn argparse default, docs/METHOD.md "Self-check")."""
    init: Literal["library", "random", "concept_only"] = "library"
    """Inside-out initialisation of the template tokens: a template from ``template_library`` (default),
    ``num_random_tokens`` random vocabulary tokens, or the concept word alone (its own tokens repeated as a
    learnable prefix) (reports/open_questions.md, template-bias study)."""
    template_library: str = "default"
    """"default" (the project's 125 neutral templates) or a text file of templates with one '{}' each."""
    reinit: Literal["resample", "latest"] = "resample"
    """Per cycle: draw a fresh template ("resample") or continue from the last optimised one ("latest")."""
    num_random_tokens: int = 4
    """Template length for init="random"."""
    objective: Literal["h2_original", "h2_concept"] = "h2_original"
    """H2 = cos(g_n(x), g_o(x)) (default) or cos(g_n(x), g_o(c)) (the alternative reading, docs/METHOD.md "Self-check")."""
    h1_weight: float = 1.0
    """λ1, weight of H1 = cos(g_o(x), g_o(c)) (stay in the concept domain); 0 is the H2-only ablation."""
    h2_weight: float = 1.0
    """λ2, weight of H2 = cos(g_n(x), g_o(x)) (find what the edit still encodes as the original did); 1 in the
    method, 0 is the H1-only ablation (docs/METHOD.md "Self-check")."""
    features: Literal["pooled", "pooled+sequence"] = "pooled+sequence"
    """Text features in H1/H2: pooled only, or pooled plus mean per-token cosine over the sequence."""
    norm_clip: bool = True
    """Clip each optimised token vector's L2 norm to the largest norm in the vocabulary table (§1.6)."""
    num_adv_tokens: int = 1
    """AdvUnlearn baseline: number of adversarial prefix tokens (prefix_k)."""

    def __post_init__(self) -> None:
        check_field_types("attack", self)
        _require(self.attack_steps >= 1, f"attack.attack_steps={self.attack_steps}: must be >= 1.")
        _require(self.attack_lr > 0, f"attack.attack_lr={self.attack_lr}: must be > 0.")
        _require(1 <= self.num_random_tokens <= 20, f"attack.num_random_tokens={self.num_random_tokens}: allowed 1..20.")
        _require(1 <= self.num_adv_tokens <= 20, f"attack.num_adv_tokens={self.num_adv_tokens}: allowed 1..20.")
        _require(self.h1_weight >= 0, f"attack.h1_weight={self.h1_weight}: must be >= 0.")
        _require(self.h2_weight >= 0, f"attack.h2_weight={self.h2_weight}: must be >= 0.")
        _require(self.h1_weight > 0 or self.h2_weight > 0,
                 "attack.h1_weight and attack.h2_weight are both 0: the attack would have no objective; set one > 0.")
        _require(bool(self.template_library.strip()),
                 "attack.template_library is empty: use 'default' or the path of a template file.")


@dataclass(frozen=True, kw_only=True)
class RetainConfig:
    retain_prompts: str = "auto"
    """Retain prompt set: "auto" (the model's default: the world's own retain captions for the bundled
    world, AdvUnlearn's COCO-object set otherwise), "coco_object", "imagenet243", or a CSV/TXT path."""
    retain_batch_size: int = 32
    """b_retain, retain prompts per step for the semantic graph (docs/METHOD.md "The total loss"; AdvUnlearn uses 5)."""
    top_k: int = 4
    """k retain prompts that get the local predicted-noise loss (docs/METHOD.md "The total loss")."""
    retain_loss_rows: int = 0
    """Approximation, off by default (0: L_image over all k selected prompts, docs/METHOD.md "The total loss"). m in 1..top_k: each
    step computes L_image over m of the k, drawn uniformly without replacement. The mean over the m rows is an
    unbiased estimate of the mean over the k; each dropped row saves one student UNet forward + backward (and,
    without a warm trajectory bank, its rollout and frozen-target rows). SAGE only (ESD and AdvUnlearn ignore
    it). With W Ray Train workers it applies per worker: each keeps ceil(m / W) of its ceil(k / W) rows.
    Its measured effect on RER and retention is in reports/benchmarks.md (it costs retention on some seeds)."""
    top_k_selection: Literal["most_drifted", "least_concept_similar", "random", "all"] = "most_drifted"
    """Which k: lowest cos(g_n(r), g_o(r)) (default), least similar to the concept (alternative reading),
    random, or all b_retain (AdvUnlearn-style)."""
    graph_loss: Literal["mse", "kl"] = "mse"
    """L_graph: mean squared difference of the cosine graphs (default) or row-wise softmax KL (docs/METHOD.md "The total loss")."""
    graph_temperature: float = 0.1
    """τ of the KL variant."""
    graph_weight: float = 1.0
    """γ_g, weight of the global semantic-graph loss (docs/METHOD.md "The total loss": unknown, start at 1.0)."""
    retain_loss_weight: float = 0.4
    """γ_t, weight of the local Top-k noise loss (docs/METHOD.md "The total loss": 0.4 nudity, 3.0 style [B])."""
    pooling: Literal["eot", "mean"] = "eot"
    """Pooled sentence feature g(·): final-LayerNorm state at EOT, L2-normalised, or mean over tokens (§1.3)."""

    def __post_init__(self) -> None:
        check_field_types("retain", self)
        _require(bool(self.retain_prompts.strip()), "retain.retain_prompts is empty: use 'auto' or a file path.")
        _require(self.retain_batch_size >= 2, f"retain.retain_batch_size={self.retain_batch_size}: must be >= 2.")
        _require(self.top_k >= 1, f"retain.top_k={self.top_k}: must be >= 1.")
        _require(self.top_k <= self.retain_batch_size,
                 f"retain.top_k={self.top_k} is larger than retain.retain_batch_size={self.retain_batch_size}: "
                 "lower top_k or raise retain_batch_size.")
        _require(0 <= self.retain_loss_rows <= self.top_k,
                 f"retain.retain_loss_rows={self.retain_loss_rows}: use 0 (all top_k rows, exact) or 1..top_k "
                 f"({self.top_k}).")
        _require(self.graph_temperature > 0, f"retain.graph_temperature={self.graph_temperature}: must be > 0.")
        _require(self.graph_weight >= 0, f"retain.graph_weight={self.graph_weight}: must be >= 0.")
        _require(self.retain_loss_weight >= 0, f"retain.retain_loss_weight={self.retain_loss_weight}: must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Adam learning rate of the trainable text encoder (AdvUnlearn/ESD default, docs/METHOD.md "Hyper-parameters")."""
    num_steps: int = 1000
    """Total training iterations, warm-up included (docs/METHOD.md "Hyper-parameters")."""
    seed: int = 0
    """Seed of every random draw of the run (rollout noise, timesteps, templates, retain batches)."""

    def __post_init__(self) -> None:
        check_field_types("optim", self)
        _require(self.lr > 0, f"optim.lr={self.lr}: the learning rate must be > 0 (e.g. 1e-5).")
        _require(self.num_steps >= 1, f"optim.num_steps={self.num_steps}: must be >= 1.")
        _require(0 <= self.seed <= MAX_SEED, f"optim.seed={self.seed}: allowed 0..{MAX_SEED} (2**32 - 1).")


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    num_workers: int = 1
    """Ray Train workers per erasure (data-parallel on the trainable encoder)."""
    use_gpu: bool = False
    """One GPU per worker when True."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker (fractions allowed on small machines)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end). ``sage-dist erase`` without this field checkpoints
    after every 10 minutes of training instead, and on SIGINT/SIGTERM always (``sage-dist erase --help``)."""

    def __post_init__(self) -> None:
        check_field_types("scaling", self)
        _require(self.num_workers >= 1, f"scaling.num_workers={self.num_workers}: must be >= 1.")
        _require(self.cpus_per_worker > 0, f"scaling.cpus_per_worker={self.cpus_per_worker}: must be > 0.")
        _require(self.checkpoint_every >= 0, f"scaling.checkpoint_every={self.checkpoint_every}: must be >= 0.")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str = ""
    """MLflow tracking URI; "" means a local SQLite store (sqlite:///<abs>/mlflow.db)."""
    experiment_name: str = "sage_dist"
    """MLflow experiment."""
    log_every: int = 1
    """Log losses every N steps."""

    def __post_init__(self) -> None:
        check_field_types("tracking", self)
        _require(self.log_every >= 1, f"tracking.log_every={self.log_every}: must be >= 1.")
        _require(bool(self.experiment_name.strip()),
                 "tracking.experiment_name is empty: give an MLflow experiment name, e.g. sage_dist.")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and trainable parameters."""
    erase: EraseConfig = field(default_factory=EraseConfig)
    """Erasure method and loss."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """Self-check attack."""
    retain: RetainConfig = field(default_factory=RetainConfig)
    """Global-local retention."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and run length."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Ray Train scaling."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            _require(isinstance(value, _section_class(section.name)),
                     f"{section.name}={value!r}: expected a {_section_class(section.name).__name__}.")
        if self.erase.warmup_steps > self.optim.num_steps:
            raise ValueError(
                f"erase.warmup_steps={self.erase.warmup_steps} exceeds optim.num_steps={self.optim.num_steps}: "
                "the attack would never run; lower warmup_steps or raise num_steps.")

    # ---- flat dict round trip (Ray and MLflow see flat dicts) ---------------------------------------
    def to_flat_dict(self) -> dict[str, Any]:
        """``{"erase.negative_guidance": 1.0, ...}`` with tuples kept as tuples."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub):
                out[f"{section.name}.{f.name}"] = getattr(sub, f.name)
        return out

    @classmethod
    def from_flat_dict(cls, flat: dict[str, Any]) -> "StudyConfig":
        """Inverse of :meth:`to_flat_dict`; unknown keys raise ``ValueError``; missing keys take defaults."""
        return cls().replace_flat(flat)

    def replace_flat(self, flat: dict[str, Any]) -> "StudyConfig":
        """A copy with dotted keys replaced, values coerced to the field's type and validated."""
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section_name, field_name = _split_key(key)
            ftype = _field_type(section_name, field_name)
            grouped.setdefault(section_name, {})[field_name] = _coerce(key, value, ftype)
        sections = {name: dataclasses.replace(getattr(self, name), **vals) for name, vals in grouped.items()}
        return dataclasses.replace(self, **sections)

    def override(self, args: list[str]) -> "StudyConfig":
        """Apply ``--section.field=value`` (or ``--section.field value``) overrides; unknown keys raise."""
        return self.replace_flat(parse_overrides(args))


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--erase.negative_guidance=2.0", "--optim.lr", "1e-4"]`` -> ``{"erase.negative_guidance": "2.0", ...}``.

    Raises:
        ValueError: an argument that is not ``--section.field[=value]``, or a missing value.
    """
    flat: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"override {arg!r}: expected --section.field=value, e.g. --erase.negative_guidance=2.0")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} has no value: write {arg}=VALUE")
            key, value = body, args[i + 1]
            i += 1
        flat[key.replace("-", "_")] = value
        i += 1
    return flat


# ---- helpers -----------------------------------------------------------------------------------------
_SECTIONS = {f.name: f for f in dataclasses.fields(StudyConfig)}


def _section_class(name: str) -> type:
    return {"model": ModelConfig, "erase": EraseConfig, "attack": AttackConfig, "retain": RetainConfig,
            "optim": OptimConfig, "scaling": ScalingConfig, "tracking": TrackingConfig}[name]


def _split_key(key: str) -> tuple[str, str]:
    if "." not in key:
        raise ValueError(f"config key {key!r}: use section.field, sections are {sorted(_SECTIONS)}")
    section_name, field_name = key.split(".", 1)
    if section_name not in _SECTIONS:
        raise ValueError(f"config key {key!r}: unknown section {section_name!r}; allowed: {sorted(_SECTIONS)}")
    names = [f.name for f in dataclasses.fields(_section_class(section_name))]
    if field_name not in names:
        raise ValueError(f"config key {key!r}: unknown field {field_name!r} in {section_name}; allowed: {names}")
    return section_name, field_name


def _field_type(section_name: str, field_name: str) -> Any:
    hints = typing.get_type_hints(_section_class(section_name))
    return hints[field_name]


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    origin = get_origin(ftype)
    if origin is Literal:
        allowed = get_args(ftype)
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: allowed values are {list(allowed)}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = get_args(ftype)
        if isinstance(value, str):
            parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()] if value.strip("()[] ") else []
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise ValueError(f"{key}={value!r}: expected a comma-separated list")
        return tuple(_coerce(key, p, item_type) for p in parts)
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"{key}: union types are not used in configs")
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={value!r}: expected true or false")
    if ftype is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected an integer")
        if isinstance(value, numbers.Integral):
            return int(value)
        text = value.strip() if isinstance(value, str) else value
        try:
            return int(text)  # exact for any size ("18446744073709551615")
        except (TypeError, ValueError):
            pass
        try:
            as_float = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}: expected an integer") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"{key}={value!r}: expected an integer")
        return int(as_float)
    if ftype is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}: expected a number") from None
    if ftype is str:
        return str(value)
    raise AssertionError(f"{key}: unsupported field type {ftype}")
