"""The imbalanced-attention fix (arXiv 2501.12206; later "PAINT"): boosts of informative image tokens
chosen by the vision tower, with the head-specific modulation the paper describes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from kernels.reference import AttentionEdit, KeyEdit, attention_rows_reference
from mitigation.methods.pai import first_edited_layer
from mitigation.methods.registry import Method, MethodError, param, register, resolve_layers
from mitigation.seam.context import image_index_from_mask
from mitigation.seam.hooks import AttentionCall, Hook
from mitigation.seam.plan import LayerEdit, Plan
from mitigation.seam.request import Contribution, RequestContext

HEAD_MODES = ("sensitive", "uniform")


@torch.no_grad()
def cls_attention(vlm: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's CLS -> patch attention, summed over heads, of its first layer and of the layer
    that produces LLaVA's feature layer (-2: the penultimate). Returns two [B, P] tensors.

    One extra pass of the vision tower (hidden states only); the CLS query row is computed from the
    layer's own q/k projections, so no attention matrix is materialised.
    """
    tower = vlm.model.model.vision_tower
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    layers = encoder.layers
    out = tower(pixel_values.to(vlm.dtype), output_hidden_states=True, return_dict=True)
    hs = out.hidden_states  # hs[i] enters encoder layer i
    feature = vlm.model.config.vision_feature_layer
    if not isinstance(feature, int):
        raise MethodError("paint: the vision tower concatenates several feature layers; the summary rule needs one")
    summary_layer = max(0, feature % len(hs) - 1)  # the layer whose output is hidden_states[feature]

    def row(k: int) -> torch.Tensor:
        layer = layers[k]
        attn = layer.self_attn
        x = layer.layer_norm1(hs[k])  # [B, 1 + P, C]
        b, t, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        p = torch.softmax((q.float() @ keys.float().transpose(-1, -2)) * attn.scale, dim=-1)  # [B, heads, 1, 1 + P]
        return p[:, :, 0, 1:].sum(1)  # [B, P]

    return row(0), row(summary_layer)


def select_tokens(first: torch.Tensor, summary_scores: torch.Tensor, local_ratio: float, iqr_k: float = 1.5):
    """The paper's token sets per row, from CLS attention [B, P]:
    summary = IQR outliers of the feature layer's scores (> Q3 + iqr_k * IQR);
    local = the top ceil(local_ratio * P) patches by the first layer's scores, minus the summary tokens."""
    q1 = torch.quantile(summary_scores, 0.25, dim=-1, keepdim=True)
    q3 = torch.quantile(summary_scores, 0.75, dim=-1, keepdim=True)
    summary = summary_scores > q3 + iqr_k * (q3 - q1)
    n_local = min(first.shape[-1], math.ceil(local_ratio * first.shape[-1]))
    local = torch.zeros_like(summary)
    local.scatter_(1, first.topk(n_local, dim=-1).indices, True)
    return local & ~summary, summary


def head_weights(share: torch.Tensor, max_weight: float) -> torch.Tensor:
    """[R, H] image shares of the answer row -> per-head weights with mean 1 per row (before the clip at
    max_weight); a row that does not look at the image at all gets 1 for every head."""
    mean = share.mean(-1, keepdim=True)
    w = torch.where(mean > 0, share / mean.clamp_min(1e-12), torch.ones_like(share))
    return w.clamp(max=max_weight)


class _SensitiveHeads(Hook):
    """Per sample, per layer, per head: the boost scaled by the head's measured visual sensitivity at the
    first answer step, fixed for the rest of the generation."""

    def __init__(self, layers, local, summary, alpha, beta, max_weight, main_rows) -> None:
        self.attention_layers = frozenset(layers)
        self.local, self.summary, self.main = local, summary, main_rows
        self.alpha, self.beta, self.max_weight = alpha, beta, max_weight
        self.weights: dict[int, torch.Tensor] = {}  # layer -> [R, H]
        self._keys: dict[int, tuple[KeyEdit, ...]] = {}

    def edit(self, call: AttentionCall, edit: AttentionEdit | None) -> AttentionEdit | None:
        layer = call.layer
        if call.prefill or layer not in self._keys:
            rows = attention_rows_reference(call.query, call.key, call.mask, call.scale, call.image_index, "last")
            w = head_weights(rows[:, :, 0].sum(-1), self.max_weight) * self.main[:, None]  # [R, H]
            self.weights[layer] = w
            keys = []
            if self.alpha:
                keys.append(KeyEdit(self.local, "last", abs_scale=self.alpha * w))
            if self.beta:
                keys.append(KeyEdit(self.summary, "last", abs_scale=self.beta * w))
            self._keys[layer] = tuple(keys)
        base = edit if edit is not None else AttentionEdit()
        return replace(base, keys=base.keys + self._keys[layer])

    def keep_rows(self, n: int) -> None:
        self.local, self.summary, self.main = self.local[:n], self.summary[:n], self.main[:n]
        self.weights = {k: v[:n] for k, v in self.weights.items()}
        self._keys = {
            k: tuple(replace(e, key_mask=e.key_mask[:n], abs_scale=e.abs_scale[:n]) for e in v)
            for k, v in self._keys.items()
        }


@register("paint")
@dataclass(frozen=True)
class Paint(Method):
    """The imbalanced-attention fix: boost the answer row's attention to informative image tokens, per head.

    Token sets, per image, from the CLIP tower's CLS -> patch attention summed over heads: summary
    tokens are the IQR outliers (> Q3 + 1.5 IQR) of the layer producing LLaVA's feature layer (-2);
    local tokens are the top `local_ratio` of patches by the first layer's CLS attention, minus the
    summary tokens. On layers [s, L) with s = max(1, L // 16) (the paper's 2..31 of 32; 1..5 of the
    testbed's 6), the last query row's pre-softmax logits become z + a * |z| on local tokens and
    z + b * |z| on summary tokens (at prefill the last prompt row, then every decode row).

    Head-specific modulation (`heads="sensitive"`, the default). The paper (v1) promises "head-specific
    modulation based on measured visual sensitivity"; its code applies alpha and beta to every head.
    Lucid's design: at the first answer step (the last prompt row), in each edited layer, each head's
    visual sensitivity is measured as the share of its (unedited) attention on the image tokens, s_h;
    the head's weight is w_h = s_h / mean_h(s), clipped at `max_head_weight`, and the boosts become
    a = alpha * w_h, b = beta * w_h, fixed per sample for the rest of the generation. The weights average
    1 over a layer's heads (before the clip), so the modulated version spends the same total boost as the
    uniform one, moved to the heads that read the image and away from those that carry the text.
    `heads="uniform"` is the official code's behaviour. The measurement is a read-out of one row on the
    image keys (no extra pass); the token sets cost one extra vision-tower pass.

    Paper vs code: beta defaults to the paper's best 0.4 (code 0.3); the code's "spatial" stream (off by
    default, degenerate as written) is not implemented; the edit is the code's additive |z| form (the
    paper's figure writes it as a multiplication). LLaVA-1.5-style checkpoints only (one base view).
    Zero strength (alpha = beta = 0) is the baseline bit for bit.
    """

    paper: ClassVar[str] = (
        "Arif, Dip, Hussain, Zhang, Thomas. Fixing Imbalanced Attention to Mitigate In-Context Hallucination "
        "of Large Vision-Language Model (later: PAINT). arXiv:2501.12206"
    )

    alpha: float = param(0.7, "boost of local tokens: z += alpha*|z| (last row)", min=0.0, max=3.0)
    beta: float = param(0.4, "boost of summary tokens: z += beta*|z| (paper 0.4, code 0.3)", min=0.0, max=3.0)
    local_ratio: float = param(
        0.25, "share of patches taken as local tokens (first-layer CLS attention)", min=0.01, max=1.0
    )
    iqr_k: float = param(1.5, "summary tokens: CLS attention above Q3 + iqr_k * IQR", min=0.0, max=10.0)
    heads: str = param(
        "sensitive", "head modulation: by measured visual sensitivity (paper), or uniform (code)", choices=HEAD_MODES
    )
    max_head_weight: float = param(2.0, "clip of a head's sensitivity weight (mean weight is 1)", min=1.0, max=16.0)
    layers: tuple[int, ...] | None = param(
        None, "edited layers (default: L//16 .. L-1, the paper's 2..31 of 32)", min=0
    )

    def contribute(self, ctx: RequestContext) -> Contribution:
        layers = resolve_layers(
            self.name, self.layers, list(range(first_edited_layer(ctx.n_layers), ctx.n_layers)), ctx.n_layers
        )
        if self.alpha == 0 and self.beta == 0:
            return Contribution()
        if ctx.vlm.kind != "llava":
            raise MethodError(
                f"paint: defined for LLaVA-1.5-style checkpoints (one base view); this one is {ctx.vlm.kind}"
            )
        first, feat = cls_attention(ctx.vlm, ctx.inputs.pixel_values)
        local_p, summary_p = select_tokens(first, feat, self.local_ratio, self.iqr_k)  # [B, P]
        local, summary = self._to_positions(ctx, local_p), self._to_positions(ctx, summary_p)
        sets = {"paint.local": local, "paint.summary": summary}
        if self.heads == "sensitive":
            hook = _SensitiveHeads(layers, local, summary, self.alpha, self.beta, self.max_head_weight, ctx.main_rows())
            return Contribution(key_sets=sets, hook=hook)
        per_layer = []
        if self.alpha:
            per_layer.append(LayerEdit("paint.local", rows="last", abs_scale=self.alpha))
        if self.beta:
            per_layer.append(LayerEdit("paint.summary", rows="last", abs_scale=self.beta))
        return Contribution(plan=Plan({layer: tuple(per_layer) for layer in layers}, name="paint"), key_sets=sets)

    @staticmethod
    def _to_positions(ctx: RequestContext, patches: torch.Tensor) -> torch.Tensor:
        """[B, P] patch flags -> [R, T] prompt positions (image token j is patch j; with the "full"
        feature strategy token 0 is the CLS and patch j is token j + 1)."""
        index = image_index_from_mask(ctx.image_mask[: ctx.n_main])  # [B, N]
        offset = index.shape[1] - patches.shape[1]
        if offset not in (0, 1):
            raise MethodError(f"paint: {index.shape[1]} image tokens per row for {patches.shape[1]} vision patches")
        out = torch.zeros_like(ctx.image_mask)
        for b in range(patches.shape[0]):
            pos = index[b, offset:][patches[b]]
            out[b, pos[pos >= 0]] = True
        return out
