"""Attack prompts: a token-embedding sequence with learnable positions, and the optimisation loop every attack
shares (docs/METHOD.md, "Self-check").

Inside-out (SAGE): ``[SOT] template-prefix e(c) template-suffix [EOT] pad``; the template tokens are
learnable, the concept tokens ``e(c)`` fixed. Outside-in (AdvUnlearn): ``[SOT] T_1..T_k e(c) [EOT] pad``
with k prefix tokens initialised from random vocabulary words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sage_dist.models.text import MAX_LENGTH, PromptBatch, TextConditioner


@dataclass
class AttackPrompt:
    """One attack prompt for every encoder of the pipeline.

    ``ids[e]``: ``[77]`` int64 initial ids; ``learnable``: ``[m]`` int64 positions that are optimised;
    ``tokens[e]``: ``[m, D_e]`` float32 current embeddings at those positions (leaf tensors);
    ``eot_index``: int position of EOT.
    """

    ids: list[Tensor]
    learnable: Tensor
    tokens: list[Tensor]
    eot_index: int
    template: str

    def assemble(self, conditioner: TextConditioner) -> PromptBatch:
        """The ``[1, 77, D_e]`` embedding batch with the learnable tokens written in (differentiable)."""
        embeds = []
        for e, ids in enumerate(self.ids):
            base = conditioner.token_embedding(e)(ids[None]).to(conditioner.train_dtype)
            index = self.learnable.view(1, -1, 1).expand(1, -1, base.shape[-1])
            embeds.append(base.scatter(1, index, self.tokens[e][None]))
        return PromptBatch(embeds, torch.tensor([self.eot_index], device=self.learnable.device))

    def detached(self) -> "AttackPrompt":
        return AttackPrompt(self.ids, self.learnable, [t.detach().clone() for t in self.tokens], self.eot_index,
                            self.template)

    def state(self) -> dict[str, Tensor]:
        """Tensors for a checkpoint (safetensors-compatible)."""
        out = {f"ids.{e}": i for e, i in enumerate(self.ids)}
        out.update({f"tokens.{e}": t.detach() for e, t in enumerate(self.tokens)})
        out["learnable"] = self.learnable
        out["eot_index"] = torch.tensor(self.eot_index)
        return out

    @staticmethod
    def from_state(state: dict[str, Tensor], template: str) -> "AttackPrompt":
        n = len([k for k in state if k.startswith("ids.")])
        return AttackPrompt([state[f"ids.{e}"] for e in range(n)], state["learnable"],
                            [state[f"tokens.{e}"].clone() for e in range(n)], int(state["eot_index"]), template)


def _piece_ids(tokenizer, text: str) -> list[int]:
    text = text.strip()
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def build_attack_prompt(conditioner: TextConditioner, concept: str, *, template: str | None = None,
                        prefix_ids: list[int] | None = None) -> AttackPrompt:
    """Token layout of an attack prompt around ``concept``.

    Exactly one of ``template`` (a string with one ``{}`` slot: its words become learnable) or
    ``prefix_ids`` (learnable ids placed before the concept) is given.

    Raises:
        ValueError: the template has no ``{}`` slot, or the prompt exceeds 77 tokens.
    """
    if (template is None) == (prefix_ids is None):
        raise ValueError("give either template or prefix_ids")
    tok0 = conditioner.tokenizers[0]
    if template is not None:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' slot")
        before, after = template.split("{}")
        prefix, suffix = _piece_ids(tok0, before), _piece_ids(tok0, after)
        name = template
    else:
        prefix, suffix = list(prefix_ids), []
        name = "<prefix:" + ",".join(map(str, prefix)) + "> {}"
    concept_ids = _piece_ids(tok0, concept)
    body = prefix + concept_ids + suffix
    if len(body) + 2 > MAX_LENGTH:
        raise ValueError(f"attack prompt for {concept!r} with template {name!r} exceeds {MAX_LENGTH} tokens")
    learnable = list(range(1, 1 + len(prefix))) + list(range(1 + len(prefix) + len(concept_ids), 1 + len(body)))
    device = conditioner.device
    ids = []
    for tok in conditioner.tokenizers:
        pad = tok.pad_token_id
        row = [tok.bos_token_id] + body + [tok.eos_token_id] + [pad] * (MAX_LENGTH - len(body) - 2)
        ids.append(torch.tensor(row, dtype=torch.long, device=device))
    learn = torch.tensor(learnable, dtype=torch.long, device=device)
    tokens = [conditioner.token_embedding(e)(ids[e][learn]).to(conditioner.train_dtype).detach().clone()
              for e in range(len(ids))]
    return AttackPrompt(ids, learn, tokens, 1 + len(body), name)


def max_token_norms(conditioner: TextConditioner) -> list[float]:
    """Largest L2 norm of a row of each encoder's token-embedding table (the on-manifold clip, docs/METHOD.md "Self-check")."""
    return [float(conditioner.token_embedding(e).weight.float().norm(dim=-1).max())
            for e in range(len(conditioner.original))]


def clip_token_norms(tokens: Tensor, max_norm: float) -> Tensor:
    """Rescale rows of ``tokens`` ``[m, D]`` whose L2 norm exceeds ``max_norm``; returns a new tensor."""
    norms = tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return tokens * torch.clamp(max_norm / norms, max=1.0)


def optimise_tokens(conditioner: TextConditioner, prompt: AttackPrompt, objective: Callable[[AttackPrompt], Tensor], *,
                    attack_steps: int, attack_lr: float, max_norms: list[float] | None) -> tuple[AttackPrompt, list[float]]:
    """The loop every attack shares: ``attack_steps`` Adam steps (lr ``attack_lr``) on the learnable tokens of a
    copy of ``prompt``, minimising ``objective(prompt) -> scalar``, each step followed by the token-norm clip to
    ``max_norms[e]`` (None: no clip). Only the tokens get gradient (``torch.autograd.grad`` on them alone).

    Returns:
        the optimised copy (its tokens still leaf tensors) and the loss before each step (``attack_steps`` values).
    """
    work = prompt.detached()
    leaves = [work.tokens[e].requires_grad_(True) for e in conditioner.train_encoders]
    optimizer = torch.optim.Adam(leaves, lr=attack_lr)
    losses: list[float] = []
    for _ in range(attack_steps):
        loss = objective(work)
        grads = torch.autograd.grad(loss, leaves)
        losses.append(loss.item())
        with torch.no_grad():
            for leaf, g in zip(leaves, grads):
                leaf.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if max_norms is not None:
                for e, leaf in zip(conditioner.train_encoders, leaves):
                    leaf.copy_(clip_token_norms(leaf, max_norms[e]))
    return work, losses
