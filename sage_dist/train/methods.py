"""What each erasure method uses: one table, read by the training step instead of branching on method names.

| method       | trains                      | attack     | retain batch | graph loss | retain_loss rows     |
|--------------|-----------------------------|------------|--------------|------------|----------------------|
| "sage"       | text encoder(s)             | inside-out | yes          | yes        | Top-k of the batch   |
| "esd"        | text encoder(s)             | none       | no           | no         | none                 |
| "advunlearn" | text encoder(s)             | outside-in | yes          | no         | every prompt of it   |
| "esd-x"      | the UNet's cross-attention  | none       | no           | no         | none                 |

Sources: SAGE (docs/METHOD.md "One step"); ESD's negative-guidance loss on the concept word (Gandikota et al.
2023; "esd-x" is its ``xattn`` variant); AdvUnlearn (Zhang et al. 2024: prefix-token attack through the UNet,
the retain regulariser on every retain prompt of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sage_dist.config import Method


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """The parts of the training step a method uses."""

    trains: Literal["text_encoder", "unet_cross_attention"]
    """The text encoder copies τ_n, or the ``attn2`` weights of a copy of the UNet (the text encoder stays frozen)."""
    attack: Literal["none", "inside_out", "outside_in"]
    """Self-check after warm-up: SAGE's text-space attack, AdvUnlearn's UNet attack, or none (the word only)."""
    retain: bool
    """Draws a retain batch every step (``retain.retain_batch_size`` prompts)."""
    graph_loss: bool
    """Adds the global semantic-graph loss over the retain batch (weight ``retain.graph_weight``)."""
    top_k: bool
    """``retain_loss`` on the Top-k selection of ``retain.top_k_selection``; False: on every retain prompt."""
    retain_loss_rows: bool
    """Honours ``retain.retain_loss_rows`` (the subsample approximation)."""


METHODS: dict[str, MethodSpec] = {
    "sage": MethodSpec(trains="text_encoder", attack="inside_out", retain=True, graph_loss=True, top_k=True,
                       retain_loss_rows=True),
    "esd": MethodSpec(trains="text_encoder", attack="none", retain=False, graph_loss=False, top_k=False,
                      retain_loss_rows=False),
    "advunlearn": MethodSpec(trains="text_encoder", attack="outside_in", retain=True, graph_loss=False, top_k=False,
                             retain_loss_rows=False),
    "esd-x": MethodSpec(trains="unet_cross_attention", attack="none", retain=False, graph_loss=False, top_k=False,
                        retain_loss_rows=False),
}


def method_spec(method: Method) -> MethodSpec:
    """The row of :data:`METHODS` for ``erase.method``."""
    return METHODS[method]
