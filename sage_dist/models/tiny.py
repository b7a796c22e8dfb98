"""Tiny random-weight SD and SDXL pipelines built from configs (diffusers' dummy-component style).

They use the real CLIP vocabulary (:mod:`sage_dist.models.tokenizer`), so prompts tokenize exactly as on
SD v1.4, and standard diffusers classes, so every code path that runs on them runs on real checkpoints.
Nothing is downloaded. Seeded with ``torch.manual_seed(seed)`` before each component.

Sizes: text encoder hidden 32 x 4 layers; UNet blocks (32, 64) with one layer each; VAE with 4 blocks
(scale factor 8), so 64x64 images use 8x8x4 latents.
"""

from __future__ import annotations

import torch

from sage_dist.models.tokenizer import build_clip_tokenizer

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


def _text_config(hidden: int = 32, layers: int = 4, projection_dim: int = 32, pad_token_id: int = EOS_ID,
                 heads: int = 4):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=pad_token_id, projection_dim=projection_dim,
    )


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion v1.4's noise schedule.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def build_tiny_sd(seed: int = 0):
    """A random tiny ``StableDiffusionPipeline`` (64x64 images, 8x8x4 latents) on the CPU in float32."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel


    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(seed: int = 0):
    """A random tiny ``StableDiffusionXLPipeline`` with two text encoders (CLIP-L-like and bigG-like)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection


    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64, norm_num_groups=32,
    )
    vae = _vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(pad_token_id=0))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd14_shaped(seed: int = 0):
    """A ``StableDiffusionPipeline`` with SD v1.4's published UNet and CLIP ViT-L/14 text-encoder configs and
    random weights (benchmarks only: 860M-parameter UNet, 123M-parameter encoder, 64x64x4 latents).

    The VAE is the tiny one (scale factor 8, as SD's): erasure never runs the VAE, so its size is irrelevant.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel


    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(hidden=768, layers=12, projection_dim=768, heads=12))
    pipe = StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
