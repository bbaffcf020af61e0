"""PAI (ECCV 2024): amplified image attention of the answer row, optional image-free guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mitigation.methods.registry import Method, param, register, resolve_layers
from mitigation.seam.plan import LayerEdit, Plan
from mitigation.seam.request import STREAM_KINDS, Contribution, RequestContext, SecondStream


def first_edited_layer(n_layers: int) -> int:
    """The layer rule shared by PAI and the imbalanced-attention fix: skip the first L // 16 layers
    (at least one): 2 of LLaVA-1.5's 32 (the papers' layers 2..31), 1 of the testbed's 6."""
    return max(1, n_layers // 16)


def guidance(gamma: float, cutoff: float):
    """PAI's image-centric logit refinement as a logits step: log-probabilities
    gamma * (log p - log p_free) + log p_free, restricted to tokens with log p >= log(cutoff) + max log p."""

    def step(main: torch.Tensor, free: torch.Tensor | None) -> torch.Tensor:
        if free is None:
            raise RuntimeError("pai guidance needs the image-free stream's logits")
        s = torch.log_softmax(main.float(), -1)
        u = torch.log_softmax(free.float(), -1)
        out = gamma * (s - u) + u
        if cutoff > 0:
            keep = s >= math.log(cutoff) + s.max(-1, keepdim=True).values
            out = out.masked_fill(~keep, float("-inf"))
        return out

    return step


@register("pai")
@dataclass(frozen=True)
class PAI(Method):
    """PAI: amplify the answer row's attention to every image token; optionally guide by the image-free model.

    On layers [s, L) with s = max(1, L // 16) (the paper's 2..31 of 32; 1..5 of the testbed's 6), the
    last query row's pre-softmax logits on every image token become z + alpha * |z| (at prefill the last
    prompt row, then every decode row). With gamma != 1 an image-free second stream runs in the same batch
    ("strip": the prompt without its image, as PAI's code builds it) and the next-token log-probabilities
    become gamma * (log p - log p_free) + log p_free, keeping only tokens with log p >= log(cutoff) +
    max log p (PAI's CFG processor; the paper writes gamma * p - (gamma - 1) * p_free). gamma = 1 runs no
    second stream.

    `rows="all"` amplifies every query row, the question's own rows included: not PAI, a diagnostic
    Lucid adds to see whether a prior decided in the question rows can be reached (README, "Mitigation
    methods").

    Paper vs code: PAI's code sends its text-only pass through the same patched attention, with image
    positions that index text tokens there; here the image-free stream is the plain model. Zero strength
    (alpha = 0, gamma = 1) is the baseline bit for bit.
    """

    paper: ClassVar[str] = (
        "Liu, Zheng, Chen. Paying More Attention to Image: A Training-Free Method for Alleviating "
        "Hallucination in LVLMs. ECCV 2024, arXiv:2407.21771"
    )

    alpha: float = param(0.5, "image-attention amplification: z += alpha*|z| on image keys, last row", min=0.0, max=5.0)
    gamma: float = param(1.1, "guidance: gamma*(log p - log p_free) + log p_free; 1 = off", min=1.0, max=5.0)
    cutoff: float = param(0.1, "guidance plausibility cut: keep tokens with p >= cutoff * max p", min=0.0, max=1.0)
    free_stream: str = param(
        "strip", "the image-free stream: strip the image tokens, or a mean-colour image", choices=STREAM_KINDS
    )
    layers: tuple[int, ...] | None = param(
        None, "edited layers (default: L//16 .. L-1, the paper's 2..31 of 32)", min=0
    )
    rows: str = param(
        "last", "query rows amplified: the answer row (paper) or every row (a diagnostic)", choices=("last", "all")
    )

    def second_stream(self) -> SecondStream | None:
        if self.gamma == 1.0:
            return None
        return SecondStream(self.free_stream, until="end", read_by_logits=True)

    def contribute(self, ctx: RequestContext) -> Contribution:
        layers = resolve_layers(
            self.name, self.layers, list(range(first_edited_layer(ctx.n_layers), ctx.n_layers)), ctx.n_layers
        )
        plan = Plan()
        if self.alpha != 0:
            edit = LayerEdit("image", rows=self.rows, abs_scale=self.alpha)
            plan = Plan({layer: edit for layer in layers}, name="pai")
        step = guidance(self.gamma, self.cutoff) if self.gamma != 1.0 else None
        return Contribution(plan=plan, logits=step)
