"""Architectures of the bundled world's models, in standard diffusers / transformers classes.

* SD: ``CLIPTextModel`` (hidden 64 x 2 layers, the real CLIP vocabulary: 49,408 x 64 token embedding),
  ``UNet2DConditionModel`` (blocks (32, 64), attention only at 8x8, ``addition_embed_type="text"``: pooled
  text added to the time embedding), ``AutoencoderKL`` with one block (scale factor 1: 16x16x3 images <->
  16x16x4 latents, trained briefly to near-identity), ``DDIMScheduler`` with the cosine
  (``squaredcos_cap_v2``) schedule. The UNet reads ``last_hidden_state`` (SD 1.x convention).
* SDXL twin: ``text_encoder`` is a copy of the SD encoder, ``text_encoder_2`` a ``CLIPTextModelWithProjection``
  of the same size, UNet with ``addition_embed_type="text_time"`` and ``cross_attention_dim`` 128. Note that
  ``StableDiffusionXLPipeline`` conditions on ``hidden_states[-2]`` of each encoder (here: the output of the
  first of the two layers, before the final layer norm), so the twin's encoder-1 path differs from SD's
  ``last_hidden_state`` path even though the weights are the same.
"""

from __future__ import annotations

import torch

from sage_dist.models.tokenizer import build_clip_tokenizer

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
LATENT_CHANNELS = 4
SAMPLE_SIZE = 16
TIME_IDS = (16, 16, 0, 0, 16, 16)
"""SDXL micro-conditioning (original size, crop top-left, target size) of every world image."""


def text_config(*, pad_token_id: int = EOS_ID):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=pad_token_id,
        projection_dim=TEXT_HIDDEN,
    )


def build_text_encoder(seed: int):
    """SD text encoder: transformers ``CLIPTextModel``, random init from ``seed``."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(text_config())


def build_text_encoder_2(seed: int):
    """The SDXL twin's second encoder: ``CLIPTextModelWithProjection`` (pad id 0 = "!", as SDXL)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(text_config(pad_token_id=0))


def build_vae(seed: int):
    """``AutoencoderKL`` with one block (``vae_scale_factor`` 1), 3 -> 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
        norm_num_groups=8, sample_size=SAMPLE_SIZE, mid_block_add_attention=False, scaling_factor=1.0,
    )


def build_unet(seed: int, *, xl: bool = False):
    """The world's ``UNet2DConditionModel`` (SD, or the SDXL twin's with ``xl=True``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=SAMPLE_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )
    if xl:
        return UNet2DConditionModel(
            **common, cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(**common, cross_attention_dim=TEXT_HIDDEN, addition_embed_type="text",
                                addition_embed_type_num_heads=4)


NOISE_SCHEDULES = ("cosine", "cosine_zero_snr_v")
"""``cosine``: eps prediction, DDIM "leading" spacing from t=951 (the first weights). ``cosine_zero_snr_v`` (the
shipped weights): the same betas rescaled to zero terminal SNR, v-prediction and DDIM "trailing" spacing from t=999 (Lin et al.
2023, "Common diffusion noise schedules and sample steps are flawed"): sampling then starts from pure noise as
training saw it, so the model cannot read an attribute (e.g. the world's texture) off the noise pattern."""


def build_scheduler(kind: str = "ddim", noise_schedule: str = "cosine"):
    """Cosine-schedule scheduler (``squaredcos_cap_v2``): "ddim" to sample, "ddpm" to train; ``noise_schedule``
    one of :data:`NOISE_SCHEDULES`.

    Raises:
        ValueError: unknown ``kind`` or ``noise_schedule``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise schedule {noise_schedule!r}: use one of {NOISE_SCHEDULES}")
    zero_snr_v = noise_schedule == "cosine_zero_snr_v"
    kwargs = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                  prediction_type="v_prediction" if zero_snr_v else "epsilon", rescale_betas_zero_snr=zero_snr_v)
    if kind == "ddim":
        if zero_snr_v:
            return DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
        return DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        return DDPMScheduler(**kwargs)
    raise ValueError(f"scheduler kind {kind!r}: use 'ddim' or 'ddpm'")


def assemble_sd(text_encoder, unet, vae, noise_schedule: str = "cosine"):
    """``StableDiffusionPipeline`` from trained parts (CPU, progress bar off)."""
    from diffusers import StableDiffusionPipeline


    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=build_scheduler("ddim", noise_schedule), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assemble_sdxl(text_encoder, text_encoder_2, unet, vae, noise_schedule: str = "cosine"):
    """``StableDiffusionXLPipeline`` (zeros for the empty prompt, as SDXL base) from trained parts."""
    from diffusers import StableDiffusionXLPipeline


    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet, scheduler=build_scheduler("ddim", noise_schedule),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
