"""VHR (ACL 2025): vision-aware head reinforcement, heads chosen per sample by their divergence from an
image-free stream run in lockstep."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from lucid_kernels.reference import AttentionEdit
from mitigation.methods.registry import Method, Preset, param, register, resolve_layers
from mitigation.seam.hooks import AttentionCall, Hook
from mitigation.seam.request import IMAGE_FREE_KINDS, Contribution, RequestContext, SecondStream


def vhr_layers(n_layers: int) -> list[int]:
    """The paper's layers for depth L: the second layer and the last round(7L/16) (LLaVA-1.5-7B's 32:
    {1} and the last 14, 18..31; the testbed's 6: {1} and the last 3, 3..5)."""
    n_last = int(7 * n_layers / 16 + 0.5)
    return sorted({min(1, n_layers - 1), *range(n_layers - n_last, n_layers)})


def select_heads(
    with_image: torch.Tensor, free: torch.Tensor, outlier_rule: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's head choice for one layer from the last position's head outputs [B, H, D] of both streams.

    VHD_h = ||A_h(image) - A_h(free)||_2. Outlier rule (Eq. 6): VHD_h is set to 0 where both VHD_h and
    TA_h = ||A_h(free)||^2 exceed their mean + std over the layer's heads (population std). Selected:
    VHD_h > median over heads (the mean of the middle two for an even count). Returns (selected [B, H]
    bool, vhd [B, H] after the outlier rule).
    """
    vhd = (with_image.float() - free.float()).norm(dim=-1)  # [B, H]
    if outlier_rule:
        ta = free.float().pow(2).sum(-1)
        high_vhd = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)
        high_ta = ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
        vhd = torch.where(high_vhd & high_ta, torch.zeros_like(vhd), vhd)
    median = torch.quantile(vhd, 0.5, dim=-1, keepdim=True)
    return vhd > median, vhd


class _Reinforce(Hook):
    def __init__(
        self,
        layers,
        alpha: float,
        n_main: int,
        outlier_rule: bool,
        scale_free_stream: bool,
        first_token: bool = True,
        free_start: int | None = None,
    ) -> None:
        self.attention_layers = frozenset(layers)
        self.first_token = first_token
        self.alpha, self.n_main = alpha, n_main
        self.free_start = n_main if free_start is None else free_start  # the image-free stream's first row
        self.outlier_rule, self.scale_free_stream = outlier_rule, scale_free_stream
        self.scale: dict[int, torch.Tensor] = {}  # layer -> [R, H] output scale
        self.selected: dict[int, torch.Tensor] = {}  # layer -> [B, H] bool (for inspection)
        self.vhd: dict[int, torch.Tensor] = {}

    def output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if not call.prefill:
            return out  # decode steps scale through the edit (see `edit`)
        b, f = self.n_main, self.free_start
        if out.shape[0] < f + b:
            raise RuntimeError("vhr needs its image-free stream in the prefill batch")
        sel, vhd = select_heads(out[:b, -1], out[f : f + b, -1], self.outlier_rule)  # out: [R, T, H, D]
        main = torch.where(sel, self.alpha, 1.0)
        scale = torch.ones(out.shape[0], main.shape[1], device=main.device)  # other streams' rows: unscaled
        scale[:b] = main
        if self.scale_free_stream:
            scale[f : f + b] = main
        self.scale[call.layer], self.selected[call.layer], self.vhd[call.layer] = scale, sel, vhd
        if self.alpha == 1.0 or not self.first_token:
            return out  # zero strength, or the first token left alone: heads chosen, nothing scaled yet
        # every prompt position of the chosen heads, so that the cached K/V downstream match later steps
        return out * scale[:, None, :, None].to(out.dtype)

    def edit(self, call: AttentionCall, edit: AttentionEdit | None) -> AttentionEdit | None:
        if call.prefill or self.alpha == 1.0:
            return edit
        s = self.scale[call.layer]
        base = edit if edit is not None else AttentionEdit()
        hs = s if base.head_scale is None else base.head_scale.float() * s
        return replace(base, head_scale=hs)

    def keep_rows(self, n: int) -> None:
        self.scale = {k: v[:n] for k, v in self.scale.items()}


@register("vhr")
@dataclass(frozen=True)
class VHR(Method):
    """VHR: reinforce the heads whose output diverges most from an image-free stream, chosen per sample.

    At the first answer step (the prefill), an image-free second stream runs in the same batch, in
    lockstep layer by layer. In each reinforced layer, for each sample: VHD_h = ||A_h(image) -
    A_h(free)||_2 of the heads' outputs (before o_proj) at the last position; the paper's outlier rule
    (VHD and the image-free output's squared norm both above mean + std) zeroes a head's VHD; heads with
    VHD above the layer's median have their output multiplied by alpha, at every prompt position (so the
    KV cache downstream matches later steps). The heads stay fixed for the rest of the generation (the
    stream is dropped after the prefill); selection in layer l already sees the reinforcement of earlier
    layers, as in the paper.

    Layers: the paper's {1} and the last 14 of LLaVA-1.5-7B's 32, i.e. for depth L the second layer and
    the last round(7L/16) (testbed, 6 layers: 1, 3, 4, 5).

    Paper vs code / open choices: the image-free stream is "strip" (the prompt without its image tokens,
    text positions shift; the paper's "image removed") or "mean_image" (the image replaced by the
    processor's mean colour, positions kept); whether the image-free stream is reinforced too is not
    stated: `scale_free_stream=true` (default) scales it with the same heads, as "earlier layers are
    already reinforced" suggests. Zero strength is alpha = 1 (the stream still runs; tokens equal the
    baseline exactly).

    Presets. The official repository (jinghan1he/VHR) could not be retrieved here, so `official` and
    `paper` are both the paper's text (ACL 2025): alpha 2 (Sec. 4.4, App. D Table 6; a third-party port
    also names 2.0 as the repository's default), layers {1} and the last 14 of 32 (Sec. 4.4, App. C Table 5),
    the outlier rule (Eq. 6), heads chosen at t = 0 and reinforced at every step including the first answer
    token (Algorithm 1: `first_token=true`). Whether the image-free stream is reinforced is not stated.
    """

    paper: ClassVar[str] = (
        "He et al. Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence. "
        "ACL 2025, arXiv:2412.13949"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"alpha": 2.0, "outlier_rule": True, "first_token": True},
            "jinghan1he/VHR not retrievable here: the paper's values (arXiv:2412.13949v3 Sec. 3.2 Eq. 6-7, Alg. 1, "
            "Sec. 4.4, App. C-D)",
        ),
        "paper": Preset(
            {"alpha": 2.0, "outlier_rule": True, "first_token": True},
            "arXiv:2412.13949v3 Sec. 3.2 Eq. 6-7 and Algorithm 1, Sec. 4.4, App. C Table 5, App. D Table 6",
        ),
    }

    alpha: float = param(2.0, "output scale of the selected heads (1 = off)", min=0.0, max=10.0)
    outlier_rule: bool = param(True, "the paper's Eq. 6: zero the VHD of heads that surge without the image")
    free_stream: str = param(
        "strip", "the image-free stream: strip the image tokens, or a mean-colour image", choices=IMAGE_FREE_KINDS
    )
    scale_free_stream: bool = param(True, "reinforce the image-free stream with the same heads (paper unstated)")
    layers: tuple[int, ...] | None = param(None, "reinforced layers (default: 1 and the last round(7L/16))", min=0)
    first_token: bool = param(True, "reinforce at the prefill too (the first answer token; Algorithm 1)")

    def second_stream(self) -> SecondStream:
        return SecondStream(self.free_stream, until="prefill", edited=self.scale_free_stream and self.alpha != 1.0)

    def contribute(self, ctx: RequestContext) -> Contribution:
        layers = resolve_layers(self.name, self.layers, vhr_layers(ctx.n_layers), ctx.n_layers)
        hook = _Reinforce(
            layers,
            self.alpha,
            ctx.n_main,
            self.outlier_rule,
            self.scale_free_stream,
            self.first_token,
            free_start=ctx.stream_start,
        )
        return Contribution(hook=hook)
