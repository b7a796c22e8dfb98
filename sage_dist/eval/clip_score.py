"""CLIP score: mean cosine similarity between CLIP image and text embeddings (docs/METHOD.md "Evaluation").

The protocol's model is ``openai/clip-vit-base-patch32`` (``logits_per_image / 100`` = cosine, averaged,
0-1 scale, e.g. 0.290). Values from ViT-L/14 or other models are not comparable. :class:`ClipScorer` takes
any transformers ``CLIPModel`` plus its tokenizer and image processor, so tests use a tiny random CLIP
built from a config and the real offline tokenizer.

    >>> scorer = ClipScorer.from_pretrained("openai/clip-vit-base-patch32", device="cuda")   # GPU users
    >>> scorer.score(images, prompts)            # -> per-pair cosine, numpy [N]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sage_dist.eval.metrics import clip_score_from_embeddings
from sage_dist.models.tokenizer import build_clip_tokenizer

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ClipScorer:
    """Image-text cosine with a transformers ``CLIPModel``.

    Args:
        model: ``transformers.CLIPModel``.
        tokenizer: CLIP tokenizer (prompts are truncated to 77 tokens).
        image_processor: ``transformers.CLIPImageProcessor`` matching the model's image size.
    """
    def __init__(self, model, tokenizer, image_processor, *, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_CLIP_MODEL, *, device: str = "cpu") -> "ClipScorer":
        """Load model, tokenizer and processor by Hub id or local folder (needs the Hub or a local copy)."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        return cls(CLIPModel.from_pretrained(model_id), CLIPTokenizer.from_pretrained(model_id),
                   CLIPImageProcessor.from_pretrained(model_id), device=device)

    def score(self, images: Sequence, prompts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Per-pair cosine ``[N]`` (float64) for PIL images and their prompts.

        Raises:
            ValueError: different numbers of images and prompts.
        """
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), batch_size):
            ims = [im.convert("RGB") for im in images[start:start + batch_size]]
            txt = list(prompts[start:start + batch_size])
            pixel = self.image_processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
            tokens = self.tokenizer(txt, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
            with torch.no_grad():
                image_embeds = self.model.get_image_features(pixel_values=pixel)
                text_embeds = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                           attention_mask=tokens["attention_mask"].to(self.device))
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
            out.append(clip_score_from_embeddings(image_embeds.float().cpu().numpy(),
                                                  text_embeds.float().cpu().numpy()))
        return np.concatenate(out) if out else np.zeros((0,))


def build_tiny_clip_scorer(seed: int = 0) -> ClipScorer:
    """A random tiny CLIP (text hidden 32, vision 32 px / patch 8) with the real CLIP tokenizer: tests only."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel


    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipScorer(CLIPModel(config), build_clip_tokenizer(), processor)
