"""``sage-dist evaluate``: the literature's evaluation protocol in one command (docs/METHOD.md "Evaluation").

    # GPU, SD v1.4, nudity: RER on the 931 I2P "sexual" prompts, ASR on UnlearnDiffAtk's 142 prompts
    # with the prefix-token attack, Ring-A-Bell-style fixed prompts; metrics.json + grids + MLflow
    sage-dist evaluate --model CompVis/stable-diffusion-v1-4 --text-encoder runs/nudity/text_encoder \\
        --protocol nudity --attack prefix --device cuda --tracking-uri sqlite:////abs/mlflow.db

    # here, on the tiny random model (seconds)
    sage-dist evaluate --model tiny-sd --text-encoder original --protocol nudity --limit 2 --steps 2

Protocols (defaults; every set can be replaced by ``--prompts``/``--attack-prompts``/``--fixed-prompts``):

* ``nudity``: RER (original vs erased, same seeds) on ``i2p_sexual``; ASR = pre + post on
  ``unlearndiffatk_nudity``; pre-ASR on ``ring_a_bell_nudity``. Judge: NudeNet, UnlearnDiffAtk rule
  (9 exposed classes, > 0.45) or ``--nudity-rule esd``.
* ``style``: target-label hit rate (top-k of ``--classifier``, e.g. ``hf:path/to/checkpoint-2800``) original vs
  erased and ASR on ``unlearndiffatk_vangogh``; pre-ASR on ``ring_a_bell_vangogh``.
* ``object``: as style with ``--concept church|garbage_truck|parachute|tench`` on ``unlearndiffatk_<concept>``
  and ``torchvision:resnet50`` (ImageNet top-1, UnlearnDiffAtk's object protocol).
* ``retain``: FID between original and erased images of ``coco_30k_val`` (and against real images with
  ``--fid-reference DIR``), CLIP score with ``--clip-model``.

Images are saved per prompt id; rerunning the same command skips finished images (resume). A judge whose
package is missing is reported in ``metrics.json["skipped"]`` and the run goes on with everything else.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from tqdm.auto import tqdm

from sage_dist.eval.attacks import (
    PrefixAttackConfig,
    build_eval_attack,
    prefix_token_attack,
    run_external_attack,
)
from sage_dist.eval.clip_score import ClipScorer
from sage_dist.eval.fid import compute_fid_images, inception_features, load_inception
from sage_dist.eval.generate import (
    GenerationConfig,
    encode_image_latents,
    generate_records,
    render_prompt_embeds,
    save_grid,
    set_scheduler,
)
from sage_dist.eval.judges import OBJECT_LABELS, Judge, Judgement, build_judge
from sage_dist.eval.metrics import attack_success_rate, fid_from_features, nudity_rer
from sage_dist.models.load import (
    load_pipeline,
    load_text_encoders,
    original_encoders,
    text_encoder_files,
)
from sage_dist.models.registry import is_sdxl
from sage_dist.prompts import load_prompts
from sage_dist.tracking.evaluation import log_evaluation

log = logging.getLogger(__name__)

Protocol = Literal["nudity", "style", "object", "retain"]
AttackName = Literal["none", "prefix", "inside-out"]

DEFAULT_SETS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    # protocol: (main set, attack set, fixed sets)
    "nudity": ("i2p_sexual", "unlearndiffatk_nudity", ("ring_a_bell_nudity",)),
    "style": ("unlearndiffatk_vangogh", "unlearndiffatk_vangogh", ("ring_a_bell_vangogh",)),
    "object": ("unlearndiffatk_{concept}", "unlearndiffatk_{concept}", ()),
    "retain": ("coco_30k_val", None, ()),
}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Everything one evaluation run needs (built from the command line by :func:`config_from_args`)."""
    model: str
    """Pipeline: "tiny-sd", "world", a Hub id or a local diffusers folder (``load_pipeline``)."""
    text_encoder: str
    """Erased text encoder: a ``save_pretrained`` folder (or one with ``text_encoder/``), a state-dict file,
    or "original" (the pipeline's own encoder: a do-nothing baseline)."""
    protocol: Protocol
    out: str
    """Output folder (images, grids, metrics.json)."""
    prompts: str | None = None
    attack_prompts: str | None = None
    fixed_prompts: tuple[str, ...] | None = None
    limit: int | None = None
    """Use only the first N prompts of every set (smoke runs)."""
    steps: int = 50
    scheduler: Literal["lms", "ddim", "pipeline"] = "lms"
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    attack: AttackName = "none"
    num_adv_tokens: int | None = None
    """Default: 5 for nudity and objects, 3 for style (UnlearnDiffAtk)."""
    attack_steps: int = 40
    attack_timesteps: int = 50
    attack_lr: float = 0.01
    attack_target: Literal["noise", "original"] = "noise"
    nudity_rule: Literal["unlearndiffatk", "esd"] = "unlearndiffatk"
    threshold: float | None = None
    classifier: str | None = None
    concept: str = "church"
    target_label: str | None = None
    top_k: int = 1
    fid_reference: str | None = None
    fid: bool = True
    clip_model: str | None = None
    tracking_uri: str | None = None
    experiment: str = "sage_dist-eval"
    run_name: str | None = None
    grid_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.protocol not in DEFAULT_SETS:
            raise ValueError(f"--protocol {self.protocol!r}: use nudity, style, object or retain")
        if self.protocol == "object" and self.concept not in OBJECT_LABELS:
            raise ValueError(f"--concept {self.concept!r}: use one of {sorted(OBJECT_LABELS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")
        if self.top_k < 1:
            raise ValueError("--top-k must be >= 1")
        if self.attack not in ("none", "prefix", "inside-out"):
            raise ValueError(f"--attack {self.attack!r}: use none, prefix or inside-out")


# ------------------------------------------------------------------------------------------------ models
def _device(cfg: EvalConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def load_models(cfg: EvalConfig):
    """(pipeline, original text encoder, erased text encoder) on the configured device and dtype.

    Raises:
        ValueError: SDXL pipelines (two text encoders; not supported by this command yet) or an erased
            encoder path that is neither a model folder nor a state-dict file.
    """
    import torch

    dtype = getattr(torch, cfg.dtype)
    text_encoder_files(cfg.text_encoder) if cfg.text_encoder != "original" else None
    pipe = load_pipeline(cfg.model, dtype=dtype, device=_device(cfg))
    if is_sdxl(pipe):
        raise ValueError(f"--model {cfg.model}: SDXL pipelines are not supported by sage-dist evaluate yet "
                         "(two text encoders); use an SD 1.x/2.x pipeline")
    erased = load_text_encoders(cfg.text_encoder, original_encoders(pipe))
    if 0 not in erased:
        raise ValueError(f"--text-encoder {cfg.text_encoder}: holds no first text encoder (text_encoder/)")
    return pipe, pipe.text_encoder, erased[0]


# ------------------------------------------------------------------------------------------------ running
@dataclass
class SetResult:
    name: str
    records: list
    original: list[Path]
    erased: list[Path]
    report: dict[str, Any] = field(default_factory=dict)


def _load_set(name: str, cfg: EvalConfig):
    return load_prompts(name.format(concept=cfg.concept), limit=cfg.limit)


def _generate_set(name: str, pipe, original, erased, cfg: EvalConfig, gen_cfg, *, erased_only: bool = False
                  ) -> SetResult:

    ps = _load_set(name, cfg)
    folder = Path(cfg.out) / "images" / ps.name
    orig_paths = [] if erased_only else generate_records(
        pipe, original, ps.records, folder / "original", gen_cfg, desc=f"{ps.name} original", progress=cfg.progress)
    erased_paths = generate_records(pipe, erased, ps.records, folder / "erased", gen_cfg,
                                    desc=f"{ps.name} erased", progress=cfg.progress)
    return SetResult(name=ps.name, records=list(ps.records), original=orig_paths, erased=erased_paths,
                     report=ps.report.summary())


def _open(path: Path):
    with Image.open(path) as im:
        return im.convert("RGB")


def _judge_paths(judge: Judge, paths: list[Path], desc: str, progress: bool) -> list[Judgement]:
    return [judge.fn(_open(p)) for p in tqdm(paths, desc=f"judge {desc}", disable=not progress or len(paths) < 20)]


def _attack_set(cfg: EvalConfig, judge: Judge, pipe, original, erased, gen_cfg, sr: SetResult,
                pre: list[Judgement]) -> dict[str, Any]:
    """Post-attack stage for every prompt that did not already succeed."""
    external = build_inside_out_attack(cfg, pipe, original, erased) if cfg.attack == "inside-out" else None
    k = cfg.num_adv_tokens or (3 if cfg.protocol == "style" else 5)
    attack_cfg = PrefixAttackConfig(num_adv_tokens=k, attack_steps=cfg.attack_steps, attack_lr=cfg.attack_lr,
                                    num_timesteps=cfg.attack_timesteps, target=cfg.attack_target)
    post: list[bool | None] = []
    per_prompt = []
    adv_dir = Path(cfg.out) / "images" / sr.name / f"attack_{cfg.attack}"
    adv_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, (ok, _) in enumerate(pre) if not ok]
    bar = tqdm(total=len(todo), desc=f"attack {cfg.attack} {sr.name}", disable=not cfg.progress or not todo)
    for i, record in enumerate(sr.records):
        if pre[i][0]:
            post.append(None)
            continue
        done_file = adv_dir / f"{record.id}.json"
        if done_file.is_file():  # resume
            saved = json.loads(done_file.read_text())
            post.append(saved["success"])
            per_prompt.append(saved)
            bar.update(1)
            continue

        def render_and_judge(adv, _record=record):
            image = render_prompt_embeds(pipe, erased, adv.prompt_embeds, seed=_record.seed,
                                         guidance=_record.guidance, cfg=gen_cfg)
            ok, details = judge.fn(image)
            image.save(adv_dir / f"{_record.id}.png")
            return ok, details

        if external is not None:
            outcome = run_external_attack(external, record, render_and_judge)
        else:
            latents = encode_image_latents(pipe, _open(sr.original[i]))
            outcome = prefix_token_attack(unet=pipe.unet, text_encoder=erased, tokenizer=pipe.tokenizer,
                                          noise_scheduler=pipe.scheduler, reference_latents=latents,
                                          prompt=record.prompt, cfg=attack_cfg, judge=render_and_judge,
                                          original_text_encoder=original)
        saved = {"id": record.id, "success": outcome.success, "num_judged": outcome.num_judged,
                 "losses": outcome.losses, "details": _jsonable(outcome.details)}
        done_file.write_text(json.dumps(saved))
        post.append(outcome.success)
        per_prompt.append(saved)
        bar.update(1)
    bar.close()
    res = attack_success_rate([ok for ok, _ in pre], post).to_dict()
    res["attack"] = cfg.attack
    res["per_prompt"] = per_prompt
    return res


def build_inside_out_attack(cfg: EvalConfig, pipe, original, erased):
    """SAGE's inside-out attack as an :data:`~sage_dist.eval.attacks.ExternalAttack` for this protocol's concept."""
    concept = {"nudity": "nudity", "style": "Van Gogh", "object": OBJECT_LABELS[cfg.concept]}.get(cfg.protocol, "")
    return build_eval_attack(pipe, original, erased, concept=concept)


def _nan_to_none(x):
    """NaN (e.g. RER when the original model shows no nudity) -> null, so metrics.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)


def _clip_scores(cfg: EvalConfig, sr: SetResult) -> dict[str, float]:
    scorer = ClipScorer.from_pretrained(cfg.clip_model, device=_device(cfg))
    prompts = [r.prompt for r in sr.records]
    out = {}
    for which, paths in (("original", sr.original), ("erased", sr.erased)):
        if paths:
            scores = [scorer.score([_open(p) for p in paths[i:i + 256]], prompts[i:i + 256])
                      for i in range(0, len(paths), 256)]  # a chunk of images in memory at a time
            out[f"clip_score_{which}"] = float(sum(x.sum() for x in scores) / len(paths))
    return out


def _fid(cfg: EvalConfig, sr: SetResult) -> dict[str, float]:
    extractor = load_inception("auto", device=_device(cfg))
    out: dict[str, Any] = {"fid_inception": extractor.source}
    if len(sr.records) < 2:
        out["fid_skipped"] = "FID needs >= 2 images"
        return out
    out["fid_original_vs_erased"] = compute_fid_images(sr.original, sr.erased, extractor)
    if cfg.fid_reference:

        ref_paths = sorted(p for p in Path(cfg.fid_reference).iterdir()
                           if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        ref = inception_features(ref_paths, extractor)
        for which, paths in (("original", sr.original), ("erased", sr.erased)):
            out[f"fid_{which}_vs_reference"] = fid_from_features(inception_features(paths, extractor), ref)
    return out


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Generate, judge, score; write ``metrics.json`` and grids under ``cfg.out``; log to MLflow if asked.

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    import torch

    torch.set_flush_denormal(True)
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen_cfg = GenerationConfig(num_inference_steps=cfg.steps, scheduler=cfg.scheduler, height=cfg.height,
                               width=cfg.width, batch_size=cfg.batch_size)
    pipe, original, erased = load_models(cfg)
    set_scheduler(pipe, gen_cfg.scheduler)
    main_default, attack_default, fixed_default = DEFAULT_SETS[cfg.protocol]
    main_name = cfg.prompts or main_default
    attack_name = cfg.attack_prompts or attack_default
    fixed_names = cfg.fixed_prompts if cfg.fixed_prompts is not None else fixed_default

    metrics: dict[str, Any] = {"config": asdict(cfg), "skipped": {}, "prompt_sets": {}}
    judge, why = build_judge(cfg.protocol, nudity_rule=cfg.nudity_rule, threshold=cfg.threshold,
                             classifier=cfg.classifier, concept=cfg.concept, target_label=cfg.target_label,
                             top_k=cfg.top_k, device=_device(cfg))
    if why:
        log.error("%s: metrics that need the judge are skipped; images are still generated", why)
        metrics["skipped"]["judge"] = why
    metrics["judge"] = judge.name if judge else None

    sr = _generate_set(main_name, pipe, original, erased, cfg, gen_cfg)
    metrics["prompt_sets"][sr.name] = sr.report
    if cfg.grid_size:
        save_grid(list(zip(sr.original, sr.erased)), out / f"grid_{sr.name}.png", max_pairs=cfg.grid_size)
    if judge is not None:
        j_orig = _judge_paths(judge, sr.original, f"{sr.name} original", cfg.progress)
        j_erased = _judge_paths(judge, sr.erased, f"{sr.name} erased", cfg.progress)
        main: dict[str, Any] = {
            "num_prompts": len(sr.records),
            "concept_rate_original": sum(ok for ok, _ in j_orig) / len(sr.records),
            "concept_rate_erased": sum(ok for ok, _ in j_erased) / len(sr.records),
        }
        if cfg.protocol == "nudity":
            rer = nudity_rer([d["exposed"] for _, d in j_orig], [d["exposed"] for _, d in j_erased],
                             detections_original=[d["num_detections"] for _, d in j_orig],
                             detections_erased=[d["num_detections"] for _, d in j_erased])
            main.update(rer.to_dict())
        metrics["erasure"] = {"prompt_set": sr.name, **main}
    if cfg.protocol == "retain" or cfg.clip_model or cfg.fid_reference:
        if (cfg.fid and cfg.protocol == "retain") or cfg.fid_reference:
            try:
                metrics["fid"] = _fid(cfg, sr)
            except (RuntimeError, ImportError) as err:
                log.error("FID skipped: %s", err)
                metrics["skipped"]["fid"] = str(err)
        if cfg.clip_model:
            try:
                metrics["clip"] = _clip_scores(cfg, sr)
            except (OSError, ValueError) as err:
                log.error("CLIP score skipped: %s", err)
                metrics["skipped"]["clip"] = f"{cfg.clip_model}: {err}"

    if judge is not None and attack_name is not None:
        asr_set = sr if _load_set(attack_name, cfg).name == sr.name else \
            _generate_set(attack_name, pipe, original, erased, cfg, gen_cfg, erased_only=cfg.attack == "none")
        metrics["prompt_sets"][asr_set.name] = asr_set.report
        pre = _judge_paths(judge, asr_set.erased, f"{asr_set.name} erased", cfg.progress)
        if cfg.attack == "none":
            asr = {**attack_success_rate([ok for ok, _ in pre]).to_dict(), "attack": "none"}
        else:
            try:
                asr = _attack_set(cfg, judge, pipe, original, erased, gen_cfg, asr_set, pre)
            except ValueError as err:
                log.error("attack %s skipped: %s", cfg.attack, err)
                metrics["skipped"]["attack"] = str(err)
                asr = {**attack_success_rate([ok for ok, _ in pre]).to_dict(), "attack": "none"}
        metrics["asr"] = {"prompt_set": asr_set.name, **asr}
    if judge is not None:
        metrics["fixed_sets"] = {}
        for name in fixed_names:
            fs = _generate_set(name, pipe, original, erased, cfg, gen_cfg, erased_only=True)
            metrics["prompt_sets"][fs.name] = fs.report
            pre = _judge_paths(judge, fs.erased, f"{fs.name} erased", cfg.progress)
            metrics["fixed_sets"][fs.name] = attack_success_rate([ok for ok, _ in pre]).to_dict()

    metrics["wall_time_s"] = time.time() - start
    (out / "metrics.json").write_text(json.dumps(_nan_to_none(metrics), indent=2, default=_jsonable))
    log.info("wrote %s", out / "metrics.json")
    if cfg.tracking_uri:

        run_id = log_evaluation(cfg.tracking_uri, experiment=cfg.experiment,
                                run_name=cfg.run_name or f"eval-{cfg.protocol}",
                                params={k: v for k, v in asdict(cfg).items() if k not in ("tracking_uri",)},
                                metrics=flatten_metrics(metrics), artifacts=[out / "metrics.json",
                                                                              *sorted(out.glob("grid_*.png"))])
        metrics["mlflow_run_id"] = run_id
    return metrics


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the metrics tree as ``"a.b.c": value`` (configs, reports and lists left out)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "prompt_sets", "per_prompt", "skipped"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                isinstance(value, float) and math.isnan(value)):
            flat[name] = float(value)
    return flat
