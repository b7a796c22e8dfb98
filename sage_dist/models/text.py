"""Text conditioning from token embeddings: frozen original encoders τ_o, trainable copies τ_n (docs/METHOD.md "Models and trained weights").

SAGE's attack optimises token *embeddings* (docs/METHOD.md "Self-check"), so every encoder call here starts from a
token-embedding sequence ``[B, L, D]`` rather than ids. The encoder stack is run layer by layer with a
causal mask, so the output equals ``CLIPTextModel(input_ids)`` for the same embeddings (tested).

Shapes: B prompts, L <= 77 positions, D encoder width, P projection width (SDXL's second encoder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

MAX_LENGTH = 77


def core_text_model(encoder: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``encoder`` and ``final_layer_norm`` (transformers 5 layout:
    ``CLIPTextModel`` itself; ``CLIPTextModelWithProjection.text_model``; older ``.text_model``)."""
    if hasattr(encoder, "embeddings") and hasattr(encoder, "final_layer_norm"):
        return encoder
    return encoder.text_model


def select_trainable_parameters(encoder: nn.Module, *, trainable: str = "full",
                                layers: tuple[int, ...] = ()) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the trainable subset of a CLIP text encoder (docs/METHOD.md "Models and trained weights") and return it.

    "full": every parameter of the chosen encoder blocks and the final LayerNorm (AdvUnlearn's
    text_encoder_full); "attn": self-attention only; "mlp": MLP only. Token and position embeddings and
    any projection head stay frozen.

    Raises:
        ValueError: a layer index outside the encoder.
    """
    core = core_text_model(encoder)
    blocks = core.encoder.layers
    chosen = layers or tuple(range(len(blocks)))
    bad = [i for i in chosen if i >= len(blocks)]
    if bad:
        raise ValueError(f"model.trainable_layers={layers}: the encoder has {len(blocks)} blocks (0..{len(blocks) - 1}).")
    encoder.requires_grad_(False)
    params: list[nn.Parameter] = []
    for i in chosen:
        block = blocks[i]
        part = {"full": block, "attn": block.self_attn, "mlp": block.mlp}[trainable]
        for p in part.parameters():
            p.requires_grad_(True)
            params.append(p)
    if trainable == "full":
        for p in core.final_layer_norm.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def run_encoder(encoder: nn.Module, inputs_embeds: Tensor, *, output_penultimate: bool = False
                ) -> tuple[Tensor, Tensor | None]:
    """Run the encoder blocks on token embeddings.

    Args:
        inputs_embeds: ``[B, L, D]`` token embeddings (SOT, words, EOT, padding), any float dtype.
        output_penultimate: also return the input of the last block (SDXL's conditioning).

    Returns:
        ``(final, penultimate)``: ``final`` is the final-LayerNorm output ``[B, L, D]``; ``penultimate`` the
        hidden state before the last block ``[B, L, D]`` (``hidden_states[-2]``) or None.
    """
    core = core_text_model(encoder)
    from transformers.masking_utils import create_causal_mask

    hidden = core.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=core.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    layers = core.encoder.layers
    penultimate = None
    for j, layer in enumerate(layers):
        if output_penultimate and j == len(layers) - 1:
            penultimate = hidden
        hidden = layer(hidden, mask, is_causal=True)
    return core.final_layer_norm(hidden), penultimate


def pooled_feature(final: Tensor, eot_index: Tensor, *, pooling: Literal["eot", "mean"] = "eot") -> Tensor:
    """g(·) of docs/METHOD.md "Notation": the final-LN state at EOT (default) or the mean over positions 1..EOT, L2-normalised.

    Args:
        final: ``[B, L, D]`` final-LayerNorm states.
        eot_index: ``[B]`` int64 position of the end-of-text token.
    Returns:
        ``[B, D]`` unit vectors (dtype of ``final``).
    """
    rows = torch.arange(final.shape[0], device=final.device)
    if pooling == "eot":
        feat = final[rows, eot_index]
    else:
        pos = torch.arange(final.shape[1], device=final.device)[None, :]
        mask = ((pos >= 1) & (pos <= eot_index[:, None])).to(final.dtype)
        feat = (final * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(feat, dim=-1)


@dataclass
class PromptBatch:
    """Token embeddings of B prompts for every encoder of the pipeline.

    ``embeds[e]``: ``[B, 77, D_e]``; ``eot_index``: ``[B]`` int64 (same for all encoders, which share the BPE).
    """

    embeds: list[Tensor]
    eot_index: Tensor

    def __len__(self) -> int:
        return int(self.eot_index.shape[0])

    def select(self, index: Tensor | slice) -> "PromptBatch":
        return PromptBatch([e[index] for e in self.embeds], self.eot_index[index])

    def detach(self) -> "PromptBatch":
        return PromptBatch([e.detach() for e in self.embeds], self.eot_index)

    @staticmethod
    def cat(batches: list["PromptBatch"]) -> "PromptBatch":
        return PromptBatch([torch.cat([b.embeds[e] for b in batches]) for e in range(len(batches[0].embeds))],
                           torch.cat([b.eot_index for b in batches]))


@dataclass
class Conditioning:
    """What the UNet sees: ``encoder_hidden_states [B, 77, D_cross]`` and SDXL's ``added_cond_kwargs``;
    plus ``features[e]``: g(·) per encoder ``[B, D_e]`` and ``final[e]``: final-LN states ``[B, L, D_e]``."""

    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None
    features: list[Tensor]
    final: list[Tensor]

    def select(self, index: Tensor) -> "Conditioning":
        added = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], added, [f[index] for f in self.features],
                            [f[index] for f in self.final])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        added = None
        if items[0].added_cond_kwargs is not None:
            added = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in items[0].added_cond_kwargs}
        return Conditioning(torch.cat([c.encoder_hidden_states for c in items]), added,
                            [torch.cat([c.features[e] for c in items]) for e in range(len(items[0].features))],
                            [torch.cat([c.final[e] for c in items]) for e in range(len(items[0].final))])


class TrainableEncoders(nn.Module):
    """The trainable copies τ_n as one module, so DDP can wrap them (``forward`` = encode all encoders)."""

    def __init__(self, encoders: dict[int, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict({str(i): m for i, m in encoders.items()})

    def forward(self, groups: list[list[Tensor | None]], output_penultimate: bool
                ) -> list[dict[int, tuple[Tensor, Tensor | None]]]:
        """:func:`run_encoder` on every trainable copy for every group of prompts, in one call (one DDP forward per
        step even when the step encodes groups of different lengths).

        ``groups[g][e]``: ``[B_g, L_g, D_e]`` float32 for each trained encoder ``e`` (others may be None).
        Returns one ``{e: (final, penultimate)}`` per group.
        """
        return [{int(k): run_encoder(enc, embeds[int(k)], output_penultimate=output_penultimate)
                 for k, enc in self.encoders.items()} for embeds in groups]


class TextConditioner:
    """Frozen original encoders, trainable copies and the pipeline's conditioning convention.

    SD 1.x/2.x: ``encoder_hidden_states`` = final-LN states of the one encoder. SDXL: concatenation of both
    encoders' penultimate states; ``text_embeds`` = the second encoder's projected EOT state; ``time_ids``
    for an uncropped square image.
    """

    def __init__(self, pipe, *, train_encoders: tuple[int, ...] = (0,), trainable: str = "full",
                 trainable_layers: tuple[int, ...] = (), pooling: Literal["eot", "mean"] = "eot",
                 resolution: int | None = None, train_dtype: torch.dtype = torch.float32):
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.is_sdxl else [])
        self.original = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.is_sdxl else [])
        for enc in self.original:
            enc.requires_grad_(False)
        bad = [i for i in train_encoders if i >= len(self.original)]
        if bad:
            raise ValueError(f"model.train_encoders={train_encoders}: this pipeline has {len(self.original)} text "
                             f"encoder(s); use (0,)" + (" or (1,) / (0, 1)" if self.is_sdxl else ""))
        self.train_encoders = tuple(train_encoders)
        self.pooling = pooling
        copies: dict[int, nn.Module] = {}
        self.trainable_parameters: list[nn.Parameter] = []
        for i in self.train_encoders:
            enc = copy.deepcopy(self.original[i]).to(train_dtype)
            enc.train(False)
            self.trainable_parameters += select_trainable_parameters(enc, trainable=trainable, layers=trainable_layers)
            copies[i] = enc
        self.trainable = TrainableEncoders(copies)
        self._trainable_call: nn.Module = self.trainable
        self.force_zeros_uncond = bool(self.is_sdxl and pipe.config.get("force_zeros_for_empty_prompt", False))
        size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.resolution = int(size)
        self.dtype = pipe.unet.dtype
        self.train_dtype = train_dtype
        """dtype of the trainable copies, token embeddings and returned conditioning (``model.train_dtype``)."""
        self.device = pipe.unet.device

    # ---- prompts ------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[Tensor]:
        """Ids ``[B, 77]`` per encoder (padding differs between SDXL's tokenizers). Over-long prompts truncate."""
        return [tok(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids.to(self.device) for tok in self.tokenizers]

    def token_embedding(self, e: int) -> nn.Embedding:
        """The frozen token-embedding table of encoder ``e`` (shared by τ_o and τ_n)."""
        return core_text_model(self.original[e]).embeddings.token_embedding

    def embed_ids(self, ids: list[Tensor]) -> PromptBatch:
        """Token embeddings of tokenized prompts; EOT found from the first encoder's ids (id 49407)."""
        eos = self.tokenizers[0].eos_token_id
        eot = (ids[0] == eos).int().argmax(dim=1)
        return PromptBatch([self.token_embedding(e)(ids[e]).to(self.train_dtype) for e in range(len(ids))], eot.long())

    def embed(self, prompts: list[str]) -> PromptBatch:
        """Token embeddings of text prompts (float32)."""
        return self.embed_ids(self.tokenize(prompts))

    def wrap_trainable(self, wrapper) -> None:
        """Call the trainable copies through ``wrapper(module)`` (e.g. Ray Train's DDP ``prepare_model``)."""
        self._trainable_call = wrapper(self.trainable)

    def trained_encoder(self, e: int) -> nn.Module:
        """τ_n of encoder ``e`` when it is trained, else the frozen original."""
        return self.trainable.encoders[str(e)] if e in self.train_encoders else self.original[e]

    # ---- conditioning --------------------------------------------------------------------------------------
    def condition(self, batch: PromptBatch, *, trained: bool, length: int = MAX_LENGTH,
                  through_wrapper: bool = True) -> Conditioning:
        """UNet conditioning and features of a prompt batch through τ_n (``trained``) or τ_o.

        Gradients flow into the trainable parameters (when ``trained``) and into ``batch.embeds``; wrap the
        call in ``torch.no_grad()`` for frozen targets. ``through_wrapper=False`` bypasses a DDP wrapper
        (attack steps, which must not trigger gradient synchronisation). ``length < 77`` encodes only the first ``length``
        positions (exact for positions < length, since CLIP is causal); then ``encoder_hidden_states`` is
        not valid UNet conditioning and only the features are meaningful.
        """
        return self.condition_groups([(batch, length)], trained=trained, through_wrapper=through_wrapper)[0]

    def condition_groups(self, groups: list[tuple[PromptBatch, int]], *, trained: bool,
                         through_wrapper: bool = True) -> list[Conditioning]:
        """:meth:`condition` of several ``(batch, length)`` groups with one call of the trainable copies (one DDP
        forward): e.g. the UNet rows at 77 positions and the graph-only retain rows truncated after their EOT."""
        trained_out: list[dict] = [{} for _ in groups]
        if trained:
            module = self._trainable_call if through_wrapper else self.trainable
            trained_out = module([[batch.embeds[e][:, :length] if e in self.train_encoders else None
                                   for e in range(len(self.original))] for batch, length in groups], self.is_sdxl)
        return [self._assemble(batch, length, out, trained) for (batch, length), out in zip(groups, trained_out)]

    def _assemble(self, batch: PromptBatch, length: int, trained_out: dict, trained: bool) -> Conditioning:
        finals, conds, feats = [], [], []
        pooled_for_text_embeds = None
        for e in range(len(self.original)):
            x = batch.embeds[e][:, :length]
            if e in trained_out:
                final, pen = trained_out[e]
            else:
                enc = self.original[e]
                final, pen = run_encoder(enc, x.to(enc.dtype), output_penultimate=self.is_sdxl)
                final, pen = final.to(self.train_dtype), (pen.to(self.train_dtype) if pen is not None else None)
            finals.append(final)
            feats.append(pooled_feature(final, batch.eot_index, pooling=self.pooling))
            conds.append(pen if self.is_sdxl else final)
            if self.is_sdxl and e == 1:
                enc2 = self.trained_encoder(1) if trained else self.original[1]
                rows = torch.arange(final.shape[0], device=final.device)
                eot_state = final[rows, batch.eot_index]
                pooled_for_text_embeds = enc2.text_projection(eot_state.to(enc2.text_projection.weight.dtype))
                pooled_for_text_embeds = pooled_for_text_embeds.to(self.train_dtype)
        hidden = torch.cat(conds, dim=-1)
        added = None
        if self.is_sdxl:
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=self.train_dtype, device=hidden.device)
            added = {"text_embeds": pooled_for_text_embeds, "time_ids": time_ids.expand(hidden.shape[0], -1)}
        return Conditioning(hidden, added, feats, finals)

    def uncond(self, batch_size: int) -> Conditioning:
        """Conditioning of the empty prompt ∅ through τ_o, as the pipeline's classifier-free guidance uses it
        (zeros for SDXL pipelines with ``force_zeros_for_empty_prompt``)."""
        with torch.no_grad():
            c = self.condition(self.embed([""] * batch_size), trained=False)
        if self.force_zeros_uncond:
            c = Conditioning(torch.zeros_like(c.encoder_hidden_states),
                             {"text_embeds": torch.zeros_like(c.added_cond_kwargs["text_embeds"]),
                              "time_ids": c.added_cond_kwargs["time_ids"]}, c.features, c.final)
        return c
