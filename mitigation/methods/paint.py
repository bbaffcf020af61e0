"""The imbalanced-attention fix (arXiv 2501.12206; later "PAINT"): boosts of informative image tokens
chosen by the vision tower, with PAI's image-free guidance as the official runs used it; Lucid's
head-specific modulation as an option."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from lucid_kernels.reference import AttentionEdit, KeyEdit, attention_rows_reference
from mitigation.methods.pai import first_edited_layer, guidance
from mitigation.methods.registry import Method, MethodError, Preset, param, register, resolve_layers
from mitigation.seam.context import image_index_from_mask
from mitigation.seam.hooks import AttentionCall, Hook
from mitigation.seam.plan import LayerEdit, Plan
from mitigation.seam.request import IMAGE_FREE_KINDS, Contribution, RequestContext, SecondStream

HEAD_MODES = ("uniform", "sensitive")


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

    def __init__(self, layers, local, summary, alpha, beta, max_weight, main_rows, first_token=True) -> None:
        self.attention_layers = frozenset(layers)
        self.first_token = first_token
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
        if call.prefill and not self.first_token:
            return edit  # measured at the first answer step, applied from the second token on
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
    """The imbalanced-attention fix: boost the answer row's attention to informative image tokens.

    Token sets, per image, from the CLIP tower's CLS -> patch attention summed over heads: summary
    tokens are the IQR outliers (> Q3 + 1.5 IQR) of the layer producing LLaVA's feature layer (-2);
    local tokens are the top `local_ratio` of patches by the first layer's CLS attention, minus the
    summary tokens. On layers [s, L) with s = max(1, L // 16) (the paper's 2..31 of 32; 1..5 of the
    testbed's 6), the last query row's pre-softmax logits become z + alpha * |z| on local tokens and
    z + beta * |z| on summary tokens, in every head (at prefill the last prompt row, then every decode
    row). With gamma != 1, PAI's image-free guidance (`mitigation.methods.pai.guidance`): an image-free
    "strip" stream in the same batch, log-probabilities gamma * (log p - log p_free) + log p_free with the
    0.1 plausibility cut-off.

    Presets. `official` (the default) is what produced every result file the official repository commits
    (hasanar1f/PAINT@52020d6 results/chair/llava-1.5/*_alpha_0.7_beta_0.4_cfg_1.1.jsonl; the code is
    PAI's): alpha 0.7, beta 0.4, every head (modPAI/attention.py:139-147), layers 2..31, local ratio 0.25
    (hard-coded, clip_encoder.py:37,42), guidance on at gamma 1.1 (`--use-cfg --gamma 1.1`, modpai_eval.sh:17
    and the `_cfg_1.1` file names), and so, as in PAI, the first answer token is never edited
    (attention.py:139,194). `paper` is the paper's text: alpha 0.7, beta 0.4, no guidance (the paper does
    not mention it), every answer token edited.

    Lucid's option `heads="sensitive"` (not the paper's, not the code's): the paper (v1) promises
    "head-specific modulation based on measured visual sensitivity" without a formula, and no commit has
    one. Lucid's design: at the first answer step (the last prompt row), in each edited layer, each head's
    visual sensitivity is the share of its (unedited) attention on the image tokens, s_h; the head's
    weight w_h = s_h / mean_h(s) is clipped at `max_head_weight`, and the boosts become alpha * w_h and
    beta * w_h, fixed per sample. Before the clip the weights average 1 over a layer's heads (the same
    total boost as uniform); the clip lowers that total, and a head's boost can reach alpha * max_head_weight
    (1.4 at the defaults), past the collapse region of the paper's own alpha sweep (0.8 breaks, 0.9
    collapses): use it as an experiment. The measurement is a read-out of one row on the image keys (no
    extra pass); the token sets cost one extra vision-tower pass.

    Not implemented: the code's "spatial" stream (off by default, degenerate as written). The edit is the
    code's additive |z| form (the paper's figure writes it as a multiplication). LLaVA-1.5-style
    checkpoints only (one base view). Zero strength (alpha = beta = 0, gamma = 1) is the baseline bit for bit.
    """

    paper: ClassVar[str] = (
        "Arif, Dip, Hussain, Zhang, Thomas. Fixing Imbalanced Attention to Mitigate In-Context Hallucination "
        "of Large Vision-Language Model (later: PAINT). arXiv:2501.12206"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"alpha": 0.7, "beta": 0.4, "heads": "uniform", "gamma": 1.1, "cutoff": 0.1, "first_token": False},
            "hasanar1f/PAINT@52020d6 results/chair/llava-1.5/chair_eval_layers_2-32_tokens_512_bs_1_"
            "top_token_ratio_0.25_alpha_0.7_beta_0.4_cfg_1.1.jsonl; modpai_eval.sh:17 (--use-cfg --gamma 1.1); "
            "modPAI/attention.py:139-147 (every head), :139,194 (no edit during the image prefill)",
        ),
        "paper": Preset(
            {"alpha": 0.7, "beta": 0.4, "heads": "uniform", "gamma": 1.0, "cutoff": 0.1, "first_token": True},
            "arXiv:2501.12206 Table 1 and the alpha / beta sweeps (best alpha 0.7, beta 0.4); no guidance in the text",
        ),
    }

    alpha: float = param(0.7, "boost of local tokens: z += alpha*|z| (last row)", min=0.0, max=3.0)
    beta: float = param(
        0.4, "boost of summary tokens: z += beta*|z| (the runs' 0.4; argparse default 0.3)", min=0.0, max=3.0
    )
    local_ratio: float = param(
        0.25, "share of patches taken as local tokens (first-layer CLS attention)", min=0.01, max=1.0
    )
    iqr_k: float = param(1.5, "summary tokens: CLS attention above Q3 + iqr_k * IQR", min=0.0, max=10.0)
    heads: str = param(
        "uniform", "every head alike (paper and code), or Lucid's sensitivity weighting", choices=HEAD_MODES
    )
    max_head_weight: float = param(
        2.0, "heads=sensitive (Lucid's): clip of a head's weight (mean 1 before the clip)", min=1.0, max=16.0
    )
    layers: tuple[int, ...] | None = param(
        None, "edited layers (default: L//16 .. L-1, the paper's 2..31 of 32)", min=0
    )
    gamma: float = param(1.1, "PAI's guidance: gamma*(log p - log p_free) + log p_free; 1 = off", min=1.0, max=5.0)
    cutoff: float = param(0.1, "guidance plausibility cut: keep tokens with p >= cutoff * max p", min=0.0, max=1.0)
    free_stream: str = param(
        "strip", "guidance's image-free stream (PAI's: the image tokens removed)", choices=IMAGE_FREE_KINDS
    )
    first_token: bool = param(False, "edit the first answer token too (the official runs, with guidance, do not)")

    def second_stream(self) -> SecondStream | None:
        if self.gamma == 1.0:
            return None
        return SecondStream(self.free_stream, until="end", read_by_logits=True)

    def contribute(self, ctx: RequestContext) -> Contribution:
        layers = resolve_layers(
            self.name, self.layers, list(range(first_edited_layer(ctx.n_layers), ctx.n_layers)), ctx.n_layers
        )
        step = guidance(self.gamma, self.cutoff) if self.gamma != 1.0 else None
        if self.alpha == 0 and self.beta == 0:
            return Contribution(logits=step)
        if ctx.vlm.kind != "llava":
            raise MethodError(
                f"paint: defined for LLaVA-1.5-style checkpoints (one base view); this one is {ctx.vlm.kind}"
            )
        first, feat = cls_attention(ctx.vlm, ctx.inputs.pixel_values)
        local_p, summary_p = select_tokens(first, feat, self.local_ratio, self.iqr_k)  # [B, P]
        local, summary = self._to_positions(ctx, local_p), self._to_positions(ctx, summary_p)
        sets = {"paint.local": local, "paint.summary": summary}
        if self.heads == "sensitive":
            hook = _SensitiveHeads(
                layers, local, summary, self.alpha, self.beta, self.max_head_weight, ctx.main_rows(), self.first_token
            )
            return Contribution(key_sets=sets, hook=hook, logits=step)
        per_layer = []
        if self.alpha:
            per_layer.append(LayerEdit("paint.local", rows="last", abs_scale=self.alpha, first_token=self.first_token))
        if self.beta:
            per_layer.append(LayerEdit("paint.summary", rows="last", abs_scale=self.beta, first_token=self.first_token))
        plan = Plan({layer: tuple(per_layer) for layer in layers}, name="paint")
        return Contribution(plan=plan, key_sets=sets, logits=step)

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
