"""Attacks used to measure robustness (ASR) of an erased model (docs/METHOD.md "Evaluation").

(a) :func:`prefix_token_attack`: UnlearnDiffAtk's ``text_grad`` attack (Diffusion-MU-Attack,
``prefix_k``), re-implemented for a text-encoder-erased model. k adversarial tokens are inserted after the
start token. Each is a distribution over the vocabulary (``[k, V]`` on the probability simplex, initialised
uniform); a one-hot token is sampled from it (straight-through, gradient clipped with ``hardtanh``), its
embedding goes through the *erased* text encoder and the UNet on the noisy reference latents, and the loss
is the MSE between that noise prediction and the target: the added noise (``target="noise"``, UnlearnDiffAtk's
criterion, default) or the original model's prediction for the un-attacked prompt (``target="original"``).
Adam (lr 0.01, weight decay 0.1) updates the distribution, which is projected back onto the simplex.
Timesteps are spread over [0, 1000) (``T // n // 2, +T // n, ...``: 10, 30, ..., 990 for n = 50) and
visited in order, ``attack_steps`` (40) iterations each; after each timestep the argmax tokens are rendered
with the erased model and judged, and the attack stops at the first success.

(b) SAGE's own inside-out attack (``sage_dist.attack.inside_out``) and any other attack plug in through
:data:`ExternalAttack`: a callable ``record -> AdversarialPrompt`` whose ``prompt_embeds`` are rendered with
the erased model and judged like (a). See :func:`run_external_attack`.

(c) Fixed prompt sets need no code here: their pre-ASR is the ASR.

Every adversarial prompt an evaluation finds is saved (:func:`save_adversarial`: token ids and text when the
attack works on tokens, the conditioning ``[1, 77, D]`` as safetensors, seed, guidance, sampling settings and
the model's content hashes) and renders again to the same image (:func:`reproduce_adversarial_image`).

Shapes: K adversarial tokens, V vocabulary, D text width, L = 77 positions, latents [1, 4, h, w].
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sage_dist.attack.inside_out import inside_out_attack
from sage_dist.attack.prompt import build_attack_prompt, max_token_norms
from sage_dist.config import AttackConfig
from sage_dist.eval.generate import (
    GenerationConfig,
    ModelKey,
    model_key,
    render_prompt_embeds,
    sampling_settings,
    save_image_atomic,
    set_scheduler,
)
from sage_dist.models.text import TextConditioner

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PrefixAttackConfig:
    """UnlearnDiffAtk ``text_grad`` settings (defaults: its nudity config)."""

    num_adv_tokens: int = 5
    """k prefix tokens (5 for nudity, 3 for Van Gogh in UnlearnDiffAtk)."""
    attack_steps: int = 40
    """Optimisation iterations per timestep."""
    attack_lr: float = 0.01
    """Adam learning rate on the token distributions."""
    weight_decay: float = 0.1
    """Adam (L2) weight decay."""
    num_timesteps: int = 50
    """Timesteps spread evenly over [0, num_train_timesteps), visited in order; judged after each."""
    target: Literal["noise", "original"] = "noise"
    """Noise-prediction target: the added noise (UnlearnDiffAtk) or the original model's prediction."""
    seed: int = 0
    """Seed of the generator drawing noise and token samples."""

    def __post_init__(self):
        if self.num_adv_tokens < 1 or self.num_adv_tokens > 70:
            raise ValueError(f"num_adv_tokens={self.num_adv_tokens}: use 1..70 (5 for nudity, 3 for style)")
        if self.attack_steps < 1 or self.num_timesteps < 1:
            raise ValueError("attack_steps and num_timesteps must be >= 1")
        if self.attack_lr <= 0:
            raise ValueError(f"attack_lr={self.attack_lr} must be > 0 (UnlearnDiffAtk: 0.01)")
        if self.target not in ("noise", "original"):
            raise ValueError(f"target={self.target!r}: use 'noise' or 'original'")


@dataclass
class AdversarialPrompt:
    """What an attack hands back for rendering: conditioning for the erased model, and its text if any."""

    prompt_embeds: Tensor
    """``[1, L, D]`` encoder hidden states for the UNet (erased text encoder)."""
    text: str | None = None
    """Human-readable prompt (decoded tokens), when the attack works on tokens."""
    input_ids: Tensor | None = None
    """``[1, L]`` int64 token ids whose encoding gave ``prompt_embeds`` (token attacks; None for attacks in
    embedding space)."""


@dataclass
class AttackOutcome:
    """Result of attacking one prompt."""

    success: bool
    adversarial: AdversarialPrompt | None
    """The prompt judged last (the successful one when ``success``)."""
    num_judged: int
    """How many adversarial prompts were rendered and judged."""
    losses: list[float] = field(default_factory=list)
    """Mean loss per visited timestep (prefix attack)."""
    details: Any = None
    """Judge output for the last rendered image (e.g. exposed classes)."""


Judge = Callable[[AdversarialPrompt], tuple[bool, Any]]
"""Render an adversarial prompt with the erased model (record's seed and guidance) and judge the image."""
ExternalAttack = Callable[[Any], AdversarialPrompt]
"""``record -> AdversarialPrompt``: the hook for SAGE's inside-out attack and other attacks."""


def sampled_timesteps(num_timesteps: int, num_train_timesteps: int = 1000) -> list[int]:
    """UnlearnDiffAtk's ``sampled_t``: ``range(T // n // 2, T, T // n)[:n]`` (10, 30, ..., 990 for 50)."""
    step = max(num_train_timesteps // num_timesteps, 1)
    return list(range(step // 2, num_train_timesteps, step))[:num_timesteps]


def project_to_simplex(v_KV: Tensor) -> Tensor:
    """Euclidean projection of each row onto {x : x >= 0, sum x = 1} (exact, sort-based).

    UnlearnDiffAtk solves the same projection by bisection. ``v_KV`` ``[K, V]`` float; returns ``[K, V]``.
    """
    u, _ = torch.sort(v_KV, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    idx = torch.arange(1, v_KV.shape[-1] + 1, device=v_KV.device, dtype=v_KV.dtype)
    cond = (u - css / idx) > 0  # true on a prefix, always at index 0
    rho = cond.sum(-1, keepdim=True) - 1
    theta = css.gather(-1, rho) / (rho + 1).to(v_KV.dtype)
    return torch.clamp(v_KV - theta, min=0.0)


class _SampleOneHotSTE(torch.autograd.Function):
    """Forward: one-hot of a token drawn from each row's distribution. Backward: ``hardtanh(grad)``
    (UnlearnDiffAtk's ``STERandSelect``)."""

    @staticmethod
    def forward(ctx, probs_KV: Tensor, generator: torch.Generator | None):
        idx = torch.multinomial(probs_KV.detach().float().cpu(), 1, generator=generator).view(-1)
        return F.one_hot(idx, probs_KV.shape[-1]).to(probs_KV.dtype).to(probs_KV.device)

    @staticmethod
    def backward(ctx, grad_KV):
        return F.hardtanh(grad_KV), None


def noisy_latents(x0_BCHW: Tensor, noise_BCHW: Tensor, alpha_cumprod: Tensor | float) -> Tensor:
    """DDPM forward process ``sqrt(a) x0 + sqrt(1 - a) noise`` with ``a = alphas_cumprod[t]`` (UnlearnDiffAtk's
    ``get_loss``; independent of the sampling scheduler's inference timesteps)."""
    a = float(alpha_cumprod)
    return x0_BCHW * a ** 0.5 + noise_BCHW * (1.0 - a) ** 0.5


def denoising_target(x0_BCHW: Tensor, noise_BCHW: Tensor, alpha_cumprod: Tensor | float,
                     prediction_type: str = "epsilon") -> Tensor:
    """What the UNet is trained to predict at ``x_t = noisy_latents(x0, noise, a)``: ``noise`` for
    "epsilon" models (SD 1.x), ``sqrt(a) noise - sqrt(1 - a) x0`` for "v_prediction" ones (SD 2.x-v, the
    zero-terminal-SNR world; Salimans & Ho 2022, diffusers' ``get_velocity``).

    Raises:
        ValueError: another ``prediction_type`` (e.g. "sample"): not supported by the attack.
    """
    if prediction_type == "epsilon":
        return noise_BCHW
    if prediction_type == "v_prediction":
        a = float(alpha_cumprod)
        return noise_BCHW * a ** 0.5 - x0_BCHW * (1.0 - a) ** 0.5
    raise ValueError(f"scheduler prediction_type {prediction_type!r}: the prefix-token attack supports 'epsilon' "
                     "and 'v_prediction'")


def _core_text_model(encoder):
    return encoder if hasattr(encoder, "embeddings") and hasattr(encoder, "final_layer_norm") else encoder.text_model


def _prefixed_ids(tokenizer, prompt: str, k: int, placeholder_id: int) -> Tensor:
    """``[1, 77]`` ids: SOT, k placeholders, the prompt's tokens (truncated to 75 - k), EOT, padding."""
    max_len = tokenizer.model_max_length
    content = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    content = content[: max_len - 2 - k]
    ids = [tokenizer.bos_token_id] + [placeholder_id] * k + content + [tokenizer.eos_token_id]
    ids = ids + [tokenizer.pad_token_id] * (max_len - len(ids))
    return torch.tensor([ids])


def encode_ids(text_encoder, input_ids: Tensor) -> Tensor:
    """``[B, L, D]`` last hidden states of a CLIP text encoder (SD 1.x conditioning)."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


def prefix_token_attack(
    *,
    unet,
    text_encoder,
    tokenizer,
    noise_scheduler,
    reference_latents: Tensor,
    prompt: str,
    cfg: PrefixAttackConfig,
    judge: Judge,
    original_text_encoder=None,
) -> AttackOutcome:
    """UnlearnDiffAtk-style prefix-token attack on one prompt against the erased text encoder: the steps of
    :func:`prefix_attack_steps`, each timestep's prompt judged until one succeeds.

    Args:
        unet: the pipeline's UNet (frozen; SD 1.x-style, no added conditioning).
        text_encoder: the erased CLIP text encoder (frozen; only the token distributions are optimised).
        tokenizer: its CLIP tokenizer.
        noise_scheduler: provides ``alphas_cumprod``, ``config.num_train_timesteps`` and ``config.prediction_type``
            ("epsilon" or "v_prediction": the attack's denoising target follows it); any SD scheduler.
        reference_latents: ``[1, 4, h, w]`` VAE latents (scaled) of the original model's image for ``prompt``.
        prompt: the attacked prompt.
        cfg: attack settings.
        judge: renders an :class:`AdversarialPrompt` with the erased model and returns (success, details).
        original_text_encoder: needed when ``cfg.target == "original"``.

    Returns:
        :class:`AttackOutcome`; ``adversarial.text`` is "<decoded prefix> <prompt>".

    Raises:
        ValueError: ``target="original"`` without ``original_text_encoder``, or an unsupported scheduler.
    """
    outcome = AttackOutcome(success=False, adversarial=None, num_judged=0)
    steps = prefix_attack_steps(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                noise_scheduler=noise_scheduler, reference_latents=reference_latents, prompt=prompt,
                                cfg=cfg, original_text_encoder=original_text_encoder)
    for adversarial, losses in steps:
        success, details = judge(adversarial)
        outcome = AttackOutcome(success=bool(success), adversarial=adversarial, num_judged=outcome.num_judged + 1,
                                losses=list(losses), details=details)
        if success:
            break
    return outcome


def prefix_attack_steps(
    *,
    unet,
    text_encoder,
    tokenizer,
    noise_scheduler,
    reference_latents: Tensor,
    prompt: str,
    cfg: PrefixAttackConfig,
    original_text_encoder=None,
) -> Iterator[tuple[AdversarialPrompt, list[float]]]:
    """The prefix-token attack on one prompt, one visited timestep at a time (UnlearnDiffAtk's ``text_grad``):
    after ``cfg.attack_steps`` optimiser steps at a timestep, yields the prompt with the argmax prefix and the
    mean loss of every timestep so far; the caller judges it and stops iterating on success. Several prompts'
    generators can be advanced in lockstep (their images judged in one batch): each has its own random
    generator (``cfg.seed``) and optimiser, so a prompt's attack does not depend on the others.

    Args: as :func:`prefix_token_attack` (no judge).
    Raises:
        ValueError: ``target="original"`` without ``original_text_encoder``, or an unsupported scheduler
            (when the generator starts).
    """
    if cfg.target == "original" and original_text_encoder is None:
        raise ValueError("target='original' needs original_text_encoder")
    device = reference_latents.device
    generator = torch.Generator().manual_seed(cfg.seed)
    core = _core_text_model(text_encoder)
    token_embedding = core.embeddings.token_embedding
    weight_VD = token_embedding.weight.detach()
    vocab = weight_VD.shape[0]
    k = cfg.num_adv_tokens
    ids = _prefixed_ids(tokenizer, prompt, k, placeholder_id=0).to(device)
    plain_ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)

    probs_KV = torch.full((k, vocab), 1.0 / vocab, device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([probs_KV], lr=cfg.attack_lr, weight_decay=cfg.weight_decay)
    adv_holder: dict[str, Tensor] = {}

    def replace_prefix(module, inputs, output):
        adv = adv_holder.get("adv_KD")
        if adv is None:
            return output
        adv = adv.to(output.dtype)[None].expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], adv, output[:, 1 + k:]], dim=1)

    x0 = reference_latents.detach()
    num_train = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    if cfg.target != "original" and prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {prediction_type!r}: the prefix-token attack supports 'epsilon' "
                         "and 'v_prediction'")
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)
    losses: list[float] = []
    for t_int in sampled_timesteps(cfg.num_timesteps, num_train):
        t = torch.tensor([t_int], device=device, dtype=torch.long)
        total = 0.0
        for _ in range(cfg.attack_steps):
            noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
            noisy = noisy_latents(x0, noise, alphas_cumprod[t_int])
            if cfg.target == "original":
                with torch.no_grad():
                    target = unet(noisy, t, encoder_hidden_states=encode_ids(original_text_encoder, plain_ids)).sample
            else:
                target = denoising_target(x0, noise, alphas_cumprod[t_int], prediction_type)
            one_hot_KV = _SampleOneHotSTE.apply(probs_KV, generator)
            adv_holder["adv_KD"] = one_hot_KV @ weight_VD.to(one_hot_KV.dtype)
            # the hook lives for this one forward: lockstep generators share the text encoder
            handle = token_embedding.register_forward_hook(replace_prefix)
            try:
                hidden = encode_ids(text_encoder, ids)
            finally:
                handle.remove()
                adv_holder.pop("adv_KD")
            eps = unet(noisy, t, encoder_hidden_states=hidden).sample
            loss = F.mse_loss(eps.float(), target.float())
            (grad,) = torch.autograd.grad(loss, [probs_KV])
            probs_KV.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                probs_KV.copy_(project_to_simplex(probs_KV))
            total += loss.item()
        losses.append(total / cfg.attack_steps)
        adv_ids = probs_KV.detach().argmax(-1)
        attack_ids = ids.clone()
        attack_ids[0, 1:1 + k] = adv_ids
        with torch.no_grad():
            prompt_embeds = encode_ids(text_encoder, attack_ids)
        text = tokenizer.decode(adv_ids.tolist()) + " " + prompt
        yield AdversarialPrompt(prompt_embeds=prompt_embeds, text=text,
                                input_ids=attack_ids.detach().cpu().clone()), list(losses)


def run_external_attack(attack: ExternalAttack, record: Any, judge: Judge) -> AttackOutcome:
    """Hook for attacks implemented elsewhere (SAGE's inside-out attack, ...): one adversarial prompt per
    record, rendered and judged like the prefix attack."""
    adversarial = attack(record)
    success, details = judge(adversarial)
    return AttackOutcome(success=bool(success), adversarial=adversarial, num_judged=1, details=details)


def build_eval_attack(pipe, original_text_encoder, erased_text_encoder, *, concept: str, device=None,
                      attack_steps: int = 30, attack_lr: float = 1e-3):
    """SAGE's inside-out attack as an evaluation attack (the attack SAGE trains against): for each prompt record, the
    record's own prompt with the concept appended (``"<prompt>, <concept>"``) is the starting template, its
    tokens are optimised for J steps against the *erased* encoder, and the erased encoder's conditioning of
    the result is rendered.

    Args:
        pipe: the SD pipeline (its UNet is not used by the attack).
        original_text_encoder, erased_text_encoder: τ_o and τ_n (``CLIPTextModel``).
        concept: the erased concept word.
    Returns:
        ``record -> AdversarialPrompt`` with ``prompt_embeds`` ``[1, 77, D]`` float32.
    """
    original_before = pipe.text_encoder
    pipe.text_encoder = original_text_encoder
    try:
        conditioner = TextConditioner(pipe)
    finally:
        pipe.text_encoder = original_before
    conditioner.trainable.encoders["0"].load_state_dict(erased_text_encoder.state_dict())
    conditioner.trainable.requires_grad_(False)
    cfg = AttackConfig(attack_steps=attack_steps, attack_lr=attack_lr)
    with torch.no_grad():
        concept_features = conditioner.condition(conditioner.embed([concept]), trained=False).features
    norms = max_token_norms(conditioner)
    tok = conditioner.tokenizers[0]

    def attack(record) -> AdversarialPrompt:
        ids = tok(record.prompt, add_special_tokens=False).input_ids[:60]
        context = tok.decode(ids).replace("{", "(").replace("}", ")")
        start = build_attack_prompt(conditioner, concept, template=f"{context}, {{}}")
        result = inside_out_attack(conditioner, start, concept_features, cfg, max_norms=norms)
        with torch.no_grad():
            cond = conditioner.condition(result.prompt.assemble(conditioner), trained=True)
        return AdversarialPrompt(prompt_embeds=cond.encoder_hidden_states, text=start.template)

    return attack


# ---- saved adversarial prompts ---------------------------------------------------------------------------
ADVERSARIAL_JSON = "adversarial.json"
ADVERSARIAL_TENSORS = "prompt_embeds.safetensors"
ADVERSARIAL_IMAGE = "image.png"


def save_adversarial(folder: str | os.PathLike, *, adversarial: AdversarialPrompt, image, record, model: ModelKey,
                     sampling: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write one found adversarial prompt to ``folder`` so that it renders again to ``image``.

    Files: ``prompt_embeds.safetensors`` (``prompt_embeds`` ``[1, 77, D]`` as rendered, and ``input_ids``
    ``[1, 77]`` int64 for token attacks), ``image.png`` (what the erased model drew from it) and
    ``adversarial.json``: text, record id / prompt / seed / guidance, the model's content hashes
    (:class:`~sage_dist.eval.generate.ModelKey`), the sampling settings, and ``info`` (attack settings,
    success, judge details, losses). Returns the JSON written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeds": adversarial.prompt_embeds.detach().to("cpu").contiguous()}
    if adversarial.input_ids is not None:
        tensors["input_ids"] = adversarial.input_ids.detach().to("cpu", torch.int64).contiguous()
    partial = folder / f".{ADVERSARIAL_TENSORS}.{os.getpid()}.partial"
    save_file(tensors, str(partial))
    os.replace(partial, folder / ADVERSARIAL_TENSORS)
    save_image_atomic(image, folder / ADVERSARIAL_IMAGE)
    saved = {"text": adversarial.text, "has_input_ids": adversarial.input_ids is not None,
             "record": {"id": record.id, "prompt": record.prompt, "seed": int(record.seed),
                        "guidance": float(record.guidance)},
             "model": model.to_dict(), "sampling": sampling, **info}
    (folder / ADVERSARIAL_JSON).write_text(json.dumps(saved, indent=1, default=str))
    return saved


@dataclass(frozen=True)
class SavedAdversarial:
    """An adversarial prompt read back by :func:`load_adversarial`."""

    folder: Path
    prompt_embeds: Tensor
    """``[1, 77, D]`` as rendered."""
    input_ids: Tensor | None
    """``[1, 77]`` int64 (token attacks) or None."""
    info: dict[str, Any]
    """``adversarial.json``: text, record (seed, guidance), model hashes, sampling, attack settings, outcome."""


def load_adversarial(folder: str | os.PathLike) -> SavedAdversarial:
    """Read a folder written by :func:`save_adversarial`.

    Raises:
        ValueError: a file is missing or unreadable (names it).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADVERSARIAL_JSON, ADVERSARIAL_TENSORS):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}; give a folder written by save_adversarial (an evaluation's "
                             "attacks/<set>/<attack>/<prompt id>/)")
    try:
        info = json.loads((folder / ADVERSARIAL_JSON).read_text())
        tensors = load_file(str(folder / ADVERSARIAL_TENSORS))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: unreadable adversarial prompt ({err})") from err
    return SavedAdversarial(folder=folder, prompt_embeds=tensors["prompt_embeds"],
                            input_ids=tensors.get("input_ids"), info=info)


NUMERICS_ONLY = ("device", "torch", "diffusers")
"""Sampling settings that change only kernel numerics: a mismatch is a warning, not an error."""


def reproduce_adversarial_image(pipe, folder: str | os.PathLike, *, from_input_ids: bool = False):
    """Render a saved adversarial prompt again with ``pipe`` (the erased model it was found against).

    The saved scheduler is set on a shallow copy of ``pipe`` (``pipe`` is unchanged), then the model's content
    hashes and the sampling settings are checked against the saved ones, and the image is drawn from the saved
    ``prompt_embeds`` (or, with ``from_input_ids``, from re-encoding the saved token ids with ``pipe``'s text
    encoder) with the saved seed and guidance. On the machine kind that found it, the result equals the saved
    ``image.png`` bit for bit.

    Returns:
        PIL image.
    Raises:
        ValueError: the pipeline's weights or sampling settings differ from the saved ones (names what differs;
            device and torch / diffusers versions only warn), or ``from_input_ids`` for an attack that saved no token ids.
    """
    import copy

    saved = load_adversarial(folder)
    sampling = saved.info["sampling"]
    gen = GenerationConfig(num_inference_steps=sampling["num_inference_steps"], scheduler=sampling["scheduler"],
                           height=sampling["height"], width=sampling["width"], batch_size=sampling["batch_size"])
    render_pipe = copy.copy(pipe)
    set_scheduler(render_pipe, gen.scheduler)
    differ = model_key(render_pipe).differences(ModelKey(**saved.info["model"]))
    if differ:
        raise ValueError(f"{saved.folder}: the pipeline's {differ} weights differ from those the adversarial prompt "
                         "was found against; load the same model and erased encoder/UNet")
    now = sampling_settings(render_pipe, gen)
    wrong = sorted(k for k in sampling if now.get(k) != sampling[k] and k not in NUMERICS_ONLY)
    numerics = sorted(k for k in NUMERICS_ONLY if now.get(k) != sampling.get(k))
    if numerics:
        log.warning("%s: %s differ from the saved run (%s); the image may differ in its last bits", saved.folder,
                    numerics, ", ".join(f"{k} {now.get(k)} vs {sampling.get(k)}" for k in numerics))
    if wrong:
        raise ValueError(f"{saved.folder}: sampling settings differ from the saved ones: "
                         + ", ".join(f"{k} {now.get(k)!r} != {sampling[k]!r}" for k in wrong))
    embeds = saved.prompt_embeds
    if from_input_ids:
        if saved.input_ids is None:
            raise ValueError(f"{saved.folder}: this attack saved no token ids (it works in embedding space); "
                             "reproduce from prompt_embeds")
        with torch.no_grad():
            embeds = encode_ids(render_pipe.text_encoder, saved.input_ids)
    record = saved.info["record"]
    return render_prompt_embeds(render_pipe, embeds, seed=record["seed"], guidance=record["guidance"], cfg=gen)
