"""PAI (ECCV 2024): amplified image attention of the answer row, optional image-free guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mitigation.methods.registry import Method, Preset, param, register, resolve_layers
from mitigation.seam.plan import LayerEdit, Plan
from mitigation.seam.request import IMAGE_FREE_KINDS, Contribution, RequestContext, SecondStream


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
    """PAI: amplify the answer row's attention to every image token; guide by the image-free model.

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

    Presets. `official` (the default) is what LALBJ/PAI's README runs for its CHAIR / POPE numbers
    (README.md:65,68,82: `--alpha 0.2 --use-cfg --gamma 1.1`, layers 2..31 by `--start-layer 2 --end-layer
    32`, chair_eval.py:54-55; the cut-off 0.1 is hard-coded at CFG.py:53-57) and, with guidance on, it never
    edits the first answer token: `llama_modify` sets `use_cfg` (attention.py:125), which switches the edit
    off, and transformers 4.37 runs the prefill forward before the logits processor that clears it
    (CFG.py:48-49), so editing starts at the second answer token (`first_token=false`). `paper` is the
    paper's text: alpha 0.5 for LLaVA (Sec. 5.1, as read by two independent summaries; not checked against
    the PDF here) and every answer token edited. The image-free stream is the plain model in both: the
    official text-only pass runs with `use_cfg` set, so it is never edited either (it deletes the image
    tokens, positions shift: "strip"). Zero strength (alpha = 0, gamma = 1) is the baseline bit for bit.
    """

    paper: ClassVar[str] = (
        "Liu, Zheng, Chen. Paying More Attention to Image: A Training-Free Method for Alleviating "
        "Hallucination in LVLMs. ECCV 2024, arXiv:2407.21771"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"alpha": 0.2, "gamma": 1.1, "cutoff": 0.1, "first_token": False},
            "LALBJ/PAI@9bbd8bd README.md:65,68,82 (--alpha 0.2 --use-cfg --gamma 1.1); CFG.py:53-57 (cut-off 0.1); "
            "attention.py:125 + CFG.py:32-49 (the edit is off during the image prefill: first token unedited)",
        ),
        "paper": Preset(
            {"alpha": 0.5, "gamma": 1.1, "cutoff": 0.1, "first_token": True},
            "arXiv:2407.21771 Sec. 5.1 (alpha 0.5 for LLaVA, gamma 1.1; via two independent summaries)",
        ),
    }

    alpha: float = param(0.2, "image-attention amplification: z += alpha*|z| on image keys, last row", min=0.0, max=5.0)
    gamma: float = param(1.1, "guidance: gamma*(log p - log p_free) + log p_free; 1 = off", min=1.0, max=5.0)
    cutoff: float = param(0.1, "guidance plausibility cut: keep tokens with p >= cutoff * max p", min=0.0, max=1.0)
    free_stream: str = param(
        "strip", "the image-free stream: strip the image tokens, or a mean-colour image", choices=IMAGE_FREE_KINDS
    )
    layers: tuple[int, ...] | None = param(
        None, "edited layers (default: L//16 .. L-1, the paper's 2..31 of 32)", min=0
    )
    rows: str = param(
        "last", "query rows amplified: the answer row, or every row (Lucid's diagnostic)", choices=("last", "all")
    )
    first_token: bool = param(False, "edit the first answer token too (the official code with guidance does not)")

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
            edit = LayerEdit("image", rows=self.rows, abs_scale=self.alpha, first_token=self.first_token)
            plan = Plan({layer: edit for layer in layers}, name="pai")
        step = guidance(self.gamma, self.cutoff) if self.gamma != 1.0 else None
        return Contribution(plan=plan, logits=step)
