"""Train the bundled world's generators from scratch: VAE, then SD, then the SDXL twin.

Phases, each resumable from ``OUT/ckpt`` (safetensors + ``state.json``, no pickles):

1. ``vae``: the one-block ``AutoencoderKL`` learns to reconstruct cached world images (near-identity,
   latent noise 10% of the latent std so that the decoder tolerates imprecise samples). Its latents are then
   cached and their std sets ``vae.config.scaling_factor``.
2. ``sd``: text encoder + UNet jointly, cosine betas rescaled to zero terminal SNR, v-prediction with Min-SNR-5
   weighting (``--noise-schedule cosine``: the original eps schedule),
   Adam with warm-up and cosine decay over the time (or step) budget, 10% caption dropout (empty prompt),
   EMA 0.999 (the EMA weights are exported).
3. ``twin``: SDXL-style twin; its first encoder is the SD encoder (copied, frozen), the second a new
   ``CLIPTextModelWithProjection``; the UNet starts from the SD UNet where shapes match. Uncond = zeros.

Every checkpoint also exports the current EMA pipeline to ``OUT/sd`` (and ``OUT/sdxl``) with
``save_pretrained``, so ``sage-dist world quality --model OUT/sd`` can follow the learning curve.

Commands of the shipped weights: README "The bundled world" (an H200 run from scratch, then a CPU fine-tune of
both UNets to zero terminal SNR with ``--init-from``/``--twin-init-from``); from scratch on CPU:
``sage-dist world train --seed 0 --out runs/world --minutes 60``;
smoke run: ``sage-dist world train --seed 0 --out /tmp/w --steps 2 --vae-steps 2 --twin-steps 2 --num-images 256``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sage_dist.models.registry import world_weights_dir
from sage_dist.models.tokenizer import build_clip_tokenizer
from sage_dist.world import model as world_model
from sage_dist.world import scene as world_scene
from sage_dist.world.model import NOISE_SCHEDULES

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorldTrainConfig:
    """Recipe of ``sage-dist world train``."""
    seed: int = 0
    """Seeds the data, the initialisation and the training noise."""
    minutes: float = 60.0
    """Wall-clock budget of the SD phase (the learning rate decays over it)."""
    steps: int = 0
    """If > 0, also stop the SD phase after this many steps (the schedule then uses the larger progress)."""
    twin_minutes: float = 15.0
    """Wall-clock budget of the SDXL-twin phase (0 skips it)."""
    twin_steps: int = 0
    """If > 0, also stop the twin phase after this many steps."""
    vae_steps: int = 1500
    """Steps of VAE training."""
    num_images: int = 40000
    """Cached training images."""
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_minutes: float = 4.0
    """Checkpoint (and export) interval."""
    device: str = "cpu"
    num_threads: int = 2
    init_from: str = ""
    """Fine-tune: a pipeline folder whose VAE, text encoder and UNet start the SD phase (VAE phase skipped)."""
    twin_init_from: str = ""
    """Fine-tune the twin: an SDXL pipeline folder whose second text encoder and UNet start the twin phase (instead
    of a new encoder 2 and a UNet initialised from the SD UNet). Its encoder 1 is always the SD phase's encoder."""
    train_text_encoder: bool = True
    """False freezes the SD text encoder (keeps an SDXL twin's encoder 1 identical to it when fine-tuning)."""
    focus_fraction: float = 0.0
    """Fraction of each batch whose timesteps are drawn from ``focus_t_range`` instead of [0, 1000)."""
    focus_t_range: tuple[int, int] = (600, 1000)
    noise_schedule: str = "cosine_zero_snr_v"
    """:data:`sage_dist.world.model.NOISE_SCHEDULES`: "cosine_zero_snr_v" (zero terminal SNR, v-prediction, trailing
    DDIM spacing; exported in the pipelines' scheduler config; the shipped weights) or "cosine" (eps prediction,
    DDIM from t = 951: the model reads the 2-px textures off the signal left at t = 951).
    Min-SNR weighting then uses the v-loss form clamp(snr, 1, gamma) / (snr + 1), so t = 999 (snr 0) is trained."""
    high_noise_weight_cap: float = 0.0
    """If > 0, weight each sample's eps loss by clamp(1 / snr, 1, cap): emphasises getting x0 right at high noise,
    where the world's textures are decided (the fine-tune that fixed striped vs checkered)."""
    def __post_init__(self) -> None:
        if self.minutes <= 0 and self.steps <= 0:
            raise ValueError("give a positive --minutes or --steps budget for the SD phase")

        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"--noise-schedule {self.noise_schedule!r}: use one of {NOISE_SCHEDULES}")
        for flag, folder, parts in (("--init-from", self.init_from, ("vae", "text_encoder", "unet")),
                                    ("--twin-init-from", self.twin_init_from, ("text_encoder_2", "unet"))):
            missing = [part for part in parts if folder and not (Path(folder) / part).is_dir()]
            if missing:
                raise ValueError(f"{flag} {folder!r} lacks {missing}: give a diffusers pipeline folder "
                                 f"(e.g. sage_dist/world/weights/{'sdxl' if 'twin' in flag else 'sd'})")
        if self.batch_size < 1 or self.num_images < self.batch_size:
            raise ValueError(f"need num_images ({self.num_images}) >= batch_size ({self.batch_size}) >= 1")


# ---------------------------------------------------------------- checkpoint helpers (safetensors only)

def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _load(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    for pe, pl in zip(ema.parameters(), live.parameters()):
        pe.lerp_(pl, 1.0 - decay)


def _lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------- data

def build_training_images(seed: int, num_images: int) -> tuple[list[world_scene.Scene], torch.Tensor]:
    """Cached training scenes and images: float32 [N, 3, 16, 16] in [-1, 1] (held-out combos excluded)."""
    rng = np.random.default_rng(seed)
    scenes = world_scene.sample_scenes(num_images, rng, exclude_heldout=True)
    images = torch.from_numpy(world_scene.render_batch(scenes)) * 2.0 - 1.0
    return scenes, images


def _tokenize(tokenizer, captions: list[str], device: str) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _captions(scenes, idx: np.ndarray, rng: np.random.Generator, dropout: float) -> list[str]:
    return ["" if rng.random() < dropout else world_scene.caption(scenes[i], rng) for i in idx]


# ---------------------------------------------------------------- phases

def train_vae(vae, images: torch.Tensor, *, steps: int, batch_size: int, seed: int, lr: float = 2e-3) -> float:
    """Train ``vae`` to reconstruct ``images`` ([N, 3, H, W] in [-1, 1]); returns the final MSE."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    mse = float("nan")
    device = next(vae.parameters()).device
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, step / max(1, steps), 50)
        mean = vae.encode(x).latent_dist.mean
        noise = torch.randn(mean.shape, generator=gen).to(device)
        z = mean + 0.1 * mean.detach().std() * noise
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = float(loss)
        if step % 250 == 0:
            logger.info("vae step %d mse %.5f", step, mse)
    vae.eval()
    return mse


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Posterior means of ``images`` ([N, 3, H, W] in [-1, 1]) -> [N, 4, H, W] (unscaled)."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(images[i:i + batch].to(device)).latent_dist.mean for i in range(0, len(images), batch)])


def _min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weights ``[B]`` (Hang et al. 2023): eps loss min(snr, gamma) / snr; v loss
    clamp(snr, 1, gamma) / (snr + 1) (floored at 1 so that the zero-SNR step keeps the plain v-loss)."""
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)
    if v_prediction:
        return torch.clamp(snr, min=1.0, max=gamma) / (snr + 1.0)
    return torch.clamp(snr, max=gamma) / snr


class _Trainer:
    """Shared loop of the SD and twin phases: ``encode(captions) -> (encoder_hidden_states, added_cond)``."""
    def __init__(self, cfg: WorldTrainConfig, ckpt: Path, phase: str, modules: dict[str, torch.nn.Module],
                 latents: torch.Tensor, scenes, encode, minutes: float, max_steps: int, export):
        self.cfg, self.ckpt, self.phase = cfg, ckpt, phase
        self.modules = modules
        self.ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.latents, self.scenes, self.encode = latents, scenes, encode
        self.minutes, self.max_steps, self.export = minutes, max_steps, export
        self.noise_scheduler = world_model.build_scheduler("ddpm", cfg.noise_schedule)
        self.v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(cfg.device)
        self.step, self.elapsed = 0, 0.0
        self.losses: list[float] = []

    def _state_path(self) -> Path:
        return self.ckpt / f"{self.phase}_state.safetensors"

    def save(self) -> None:
        tensors = {}
        for k, m in self.modules.items():
            tensors.update(_prefixed(f"live.{k}", m))
            tensors.update(_prefixed(f"ema.{k}", self.ema[k]))
        tensors.update(_optimizer_tensors(self.opt))
        _save(tensors, self._state_path())
        meta = {"step": self.step, "elapsed_s": self.elapsed, "recent_loss": float(np.mean(self.losses[-50:] or [0.0]))}
        (self.ckpt / f"{self.phase}_progress.json").write_text(json.dumps(meta, indent=1))
        self.export({k: m for k, m in self.ema.items()})
        logger.info("%s checkpoint at step %d (%.1f min)", self.phase, self.step, self.elapsed / 60)

    def try_resume(self) -> bool:
        path = self._state_path()
        if not path.is_file():
            return False
        tensors = _load(path, self.cfg.device)
        for k, m in self.modules.items():
            m.load_state_dict(_unprefix(f"live.{k}", tensors))
            self.ema[k].load_state_dict(_unprefix(f"ema.{k}", tensors))
        _load_optimizer(self.opt, tensors)
        meta = json.loads((self.ckpt / f"{self.phase}_progress.json").read_text())
        self.step, self.elapsed = int(meta["step"]), float(meta["elapsed_s"])
        logger.info("resumed %s at step %d (%.1f min)", self.phase, self.step, self.elapsed / 60)
        return True

    def _progress(self) -> float:
        p_time = self.elapsed / (60.0 * self.minutes) if self.minutes > 0 else 0.0
        p_steps = self.step / self.max_steps if self.max_steps > 0 else 0.0
        return max(p_time, p_steps)

    def run(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 17 if self.phase == "sd" else 29, self.step])
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.step + (0 if self.phase == "sd" else 7))
        num_trainable = sum(p.numel() for p in self.params)
        logger.info("%s phase: batch %d, budget %.1f min / %d steps, %d trainable parameters, device %s",
                    self.phase, cfg.batch_size, self.minutes, self.max_steps, num_trainable, cfg.device)
        for m in self.modules.values():
            m.train()
        last_ckpt = time.time()
        t_prev = time.time()
        while self._progress() < 1.0:
            idx = rng.integers(0, len(self.latents), cfg.batch_size)
            captions = _captions(self.scenes, idx, rng, cfg.caption_dropout)
            x0 = self.latents[torch.from_numpy(idx).to(self.latents.device)]
            noise = torch.randn(x0.shape, generator=gen).to(cfg.device)
            timesteps = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
            num_focus = int(round(cfg.focus_fraction * cfg.batch_size))
            if num_focus:
                timesteps[:num_focus] = torch.randint(*cfg.focus_t_range, (num_focus,), generator=gen)
            timesteps = timesteps.to(cfg.device)
            noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(self.step, self._progress(), cfg.warmup_steps)
            hidden, added = self.encode(captions)
            pred = self.modules["unet"](noisy, timesteps, hidden, added_cond_kwargs=added).sample
            target = self.noise_scheduler.get_velocity(x0, noise, timesteps) if self.v_prediction else noise
            per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            if cfg.min_snr_gamma > 0:
                per_sample = per_sample * _min_snr_weight(self.alphas_cumprod, timesteps, cfg.min_snr_gamma,
                                                          self.v_prediction)
            if cfg.high_noise_weight_cap > 0:
                a = self.alphas_cumprod[timesteps]
                per_sample = per_sample * torch.clamp((1.0 - a) / a, 1.0, cfg.high_noise_weight_cap)
            loss = per_sample.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            for k, m in self.modules.items():
                _ema_update(self.ema[k], m, min(cfg.ema_decay, (1 + self.step) / (10 + self.step)))
            self.losses.append(float(loss))
            self.step += 1
            now = time.time()
            self.elapsed += now - t_prev
            t_prev = now
            if self.step % 50 == 0:
                logger.info("%s step %d loss %.4f (%.2f s/step, %.1f min)", self.phase, self.step,
                            float(np.mean(self.losses[-50:])), self.elapsed / self.step, self.elapsed / 60)
            if now - last_ckpt > 60.0 * cfg.checkpoint_minutes:
                self.save()
                last_ckpt = time.time()
                t_prev = last_ckpt  # checkpoint time does not count against the budget
        self.save()


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def init_twin_unet_from_sd(twin_unet, sd_unet) -> int:
    """Copy SD UNet weights into the twin's where shapes match; cross-attention K/V get SD's weights in their
    first 64 input columns (encoder 1's slot) and zeros elsewhere. Returns the number of tensors copied."""
    twin_sd, copied = twin_unet.state_dict(), 0
    for key, value in sd_unet.state_dict().items():
        if key not in twin_sd:
            continue
        target = twin_sd[key]
        if target.shape == value.shape:
            target.copy_(value)
        elif target.ndim == 2 and value.ndim == 2 and target.shape[0] == value.shape[0] and ("to_k" in key or "to_v" in key):
            target.zero_()
            target[:, : value.shape[1]].copy_(value)
        elif target.ndim == 2 and value.ndim == 4 and target.shape == value.shape[:2]:  # conv 1x1 -> linear proj
            target.copy_(value[:, :, 0, 0])
        else:
            continue
        copied += 1
    twin_unet.load_state_dict(twin_sd)
    return copied


def _export_sd(out: Path, text_encoder, unet, vae, noise_schedule: str) -> None:
    pipe = world_model.assemble_sd(text_encoder, unet, vae, noise_schedule)
    pipe.save_pretrained(str(out / "sd"), safe_serialization=True)


def _export_sdxl(out: Path, text_encoder, text_encoder_2, unet, vae, noise_schedule: str) -> None:
    pipe = world_model.assemble_sdxl(text_encoder, text_encoder_2, unet, vae, noise_schedule)
    pipe.save_pretrained(str(out / "sdxl"), safe_serialization=True)


def train_world(cfg: WorldTrainConfig, out_dir: str | Path, *, resume: bool = False) -> dict[str, float]:
    """Run (or resume) all phases into ``out_dir``; returns a summary (steps, minutes, losses).

    Raises:
        FileExistsError: ``out_dir/ckpt`` exists and ``resume`` is False.
    """
    out = Path(out_dir)
    ckpt = out / "ckpt"
    if ckpt.exists() and any(ckpt.iterdir()) and not resume:
        raise FileExistsError(f"{ckpt} holds a checkpoint: pass --resume to continue it or choose another --out")
    ckpt.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.set_flush_denormal(True)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.num_threads)
    device = cfg.device
    summary: dict[str, float] = {}

    t0 = time.time()
    scenes, images = build_training_images(cfg.seed, cfg.num_images)
    logger.info("rendered %d training images in %.1f s", len(scenes), time.time() - t0)

    # 1. VAE
    vae = world_model.build_vae(cfg.seed).to(device)
    vae_path = ckpt / "vae.safetensors"
    if cfg.init_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(Path(cfg.init_from) / "vae"), torch_dtype=torch.float32).to(device)
        vae_meta = {"mse": float("nan"), "seconds": 0.0, "scaling_factor": float(vae.config.scaling_factor),
                    "init_from": cfg.init_from}
        _save(vae.state_dict(), vae_path)
        (ckpt / "vae.json").write_text(json.dumps(vae_meta, indent=1))
    elif vae_path.is_file():
        vae.load_state_dict(_load(vae_path, device))
        vae_meta = json.loads((ckpt / "vae.json").read_text())
    else:
        t0 = time.time()
        mse = train_vae(vae, images, steps=cfg.vae_steps, batch_size=cfg.batch_size, seed=cfg.seed)
        vae_meta = {"mse": mse, "seconds": time.time() - t0}
    _freeze(vae)
    latents = encode_latents(vae, images)
    if not vae_path.is_file():
        vae_meta["scaling_factor"] = float(1.0 / latents.std())
        _save(vae.state_dict(), vae_path)
        (ckpt / "vae.json").write_text(json.dumps(vae_meta, indent=1))
    vae.register_to_config(scaling_factor=vae_meta["scaling_factor"])
    latents = (latents * vae_meta["scaling_factor"]).to(device)
    summary.update({"vae_mse": vae_meta["mse"], "vae_scaling_factor": vae_meta["scaling_factor"]})
    logger.info("vae: mse %.5f, scaling factor %.3f", vae_meta["mse"], vae_meta["scaling_factor"])

    # 2. SD
    tokenizer = build_clip_tokenizer()
    text_encoder = world_model.build_text_encoder(cfg.seed).to(device)
    unet = world_model.build_unet(cfg.seed).to(device)
    if cfg.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(str(Path(cfg.init_from) / "text_encoder"),
                                                     torch_dtype=torch.float32).to(device)
        unet = UNet2DConditionModel.from_pretrained(str(Path(cfg.init_from) / "unet"),
                                                    torch_dtype=torch.float32).to(device)
    if not cfg.train_text_encoder:
        _freeze(text_encoder)

    def encode_sd(captions):
        return text_encoder(_tokenize(tokenizer, captions, device)).last_hidden_state, None

    def export_sd(ema):
        _export_sd(out, ema["text_encoder"], ema["unet"], vae, cfg.noise_schedule)

    def export_sd_frozen_te(ema):
        _export_sd(out, text_encoder, ema["unet"], vae, cfg.noise_schedule)

    if cfg.train_text_encoder:
        sd = _Trainer(cfg, ckpt, "sd", {"text_encoder": text_encoder, "unet": unet}, latents, scenes, encode_sd,
                      cfg.minutes, cfg.steps, export_sd)
    else:
        sd = _Trainer(cfg, ckpt, "sd", {"unet": unet}, latents, scenes, encode_sd, cfg.minutes, cfg.steps,
                      export_sd_frozen_te)
    sd.try_resume()
    sd.run()
    summary.update({"sd_steps": sd.step, "sd_minutes": sd.elapsed / 60,
                    "sd_loss": float(np.mean(sd.losses[-50:])) if sd.losses else float("nan")})
    if cfg.twin_minutes <= 0 and cfg.twin_steps <= 0:
        return summary

    # 3. SDXL twin
    text_encoder_1 = _freeze(copy.deepcopy(sd.ema["text_encoder"] if cfg.train_text_encoder else text_encoder))
    if cfg.twin_init_from:
        if cfg.train_text_encoder or not cfg.init_from:
            logger.warning("--twin-init-from %s: its UNet and encoder 2 were trained with another encoder 1 than this "
                           "run's SD encoder; use --init-from <the same world's sd> --freeze-text-encoder to keep them "
                           "consistent", cfg.twin_init_from)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModelWithProjection

        folder = Path(cfg.twin_init_from)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"),
                                                                     torch_dtype=torch.float32).to(device)
        twin_unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).to(device)
    else:
        text_encoder_2 = world_model.build_text_encoder_2(cfg.seed + 1).to(device)
        twin_unet = world_model.build_unet(cfg.seed + 1, xl=True).to(device)
        init_twin_unet_from_sd(twin_unet, sd.ema["unet"])
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    time_ids = torch.tensor([world_model.TIME_IDS], dtype=torch.float32, device=device)

    def encode_twin(captions):
        keep = torch.tensor([c != "" for c in captions], device=device, dtype=torch.float32)
        with torch.no_grad():
            h1 = text_encoder_1(_tokenize(tokenizer, captions, device), output_hidden_states=True).hidden_states[-2]
        out2 = text_encoder_2(_tokenize(tokenizer_2, captions, device), output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2]], dim=-1) * keep[:, None, None]
        pooled = out2.text_embeds * keep[:, None]
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), -1)}

    def export_twin(ema):
        _export_sdxl(out, text_encoder_1, ema["text_encoder_2"], ema["unet"], vae, cfg.noise_schedule)

    twin = _Trainer(cfg, ckpt, "twin", {"text_encoder_2": text_encoder_2, "unet": twin_unet}, latents, scenes,
                    encode_twin, cfg.twin_minutes, cfg.twin_steps, export_twin)
    twin.try_resume()
    twin.run()
    summary.update({"twin_steps": twin.step, "twin_minutes": twin.elapsed / 60,
                    "twin_loss": float(np.mean(twin.losses[-50:])) if twin.losses else float("nan")})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def ship_weights(src: str | Path, *, guidance: float = 2.0, num_inference_steps: int = 20,
                 dst: str | Path | None = None) -> dict[str, float]:
    """Copy ``src/sd`` and ``src/sdxl`` (``world train`` outputs) into the package as float16 pipelines, with
    ``world_config.json``; returns their sizes in MB."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(dst) if dst is not None else world_weights_dir()
    sizes = {}
    for kind, cls in (("sd", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        if not (Path(src) / kind / "model_index.json").is_file():
            continue
        pipe = cls.from_pretrained(str(Path(src) / kind), torch_dtype=torch.float32)
        pipe.to(torch.float16).save_pretrained(str(out / kind), safe_serialization=True)
        config = {"guidance": guidance, "num_inference_steps": num_inference_steps, "resolution": 16,
                  "storage_dtype": "float16", "load_dtype": "float32"}
        (out / kind / "world_config.json").write_text(json.dumps(config, indent=1))
        sizes[f"{kind}_MB"] = sum(f.stat().st_size for f in (out / kind).rglob("*") if f.is_file()) / 2**20
    return sizes
