"""LSceneLLM's scene magnifier (arXiv 2412.01292), translated from 3D point clouds to 2D images.

**Selection** (as published): a prefill up to the selection layer (the paper's 8 of 32; it stops there,
`StopAfter`) records the instruction rows' attention to the image tokens, summed over heads; each row is
min-max scaled to 0..255 and the tokens above the threshold (96) are selected; their union over the rows
(the code selects per row; one crop per image needs one region, Lucid's translation) names the cells whose
box, in ORIGINAL pixels through the processor's geometry, is cropped from the full-resolution image and
encoded by the vision tower and projector into dense tokens.

**How the dense tokens enter** (`tokens`, the 2D design choice):

* `image`: the crop as a second image after the original in the prompt (LLaVA-1.5 was trained on one
  image; the testbed model too: measured, not assumed);
* `keys`: as LSceneLLM does in 3D, extra keys and values in every layer after the selection layer, visible
  to the instruction and answer rows only, each dense token at the RoPE position of its parent coarse
  token (the coarse cell under its centre). Training-free: LSceneLLM learns `k_proj_hd` / `v_proj_hd` and
  fine-tunes the LLM; Lucid projects the dense tokens' embeddings (the projector's output, which, as in
  LSceneLLM, no decoder layer updates) with each layer's own input norm, `k_proj` and `v_proj`. The dense
  keys take their softmax share of each text row's attention: out = (1 - s) * out_std + s * out_dense, s
  the dense keys' share of exp-mass under the row's unedited logits (so methods editing the standard
  attention keep their edit, scaled by 1 - s). Every text row sees all of the crop's dense tokens (the
  crop is already the selection), where LSceneLLM's rows each see their own selected children.

What the method made for each row (`MagnifierView`: the selected cells, the crop box, the crop) is in
`Generation.extras["magnifier"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from lucid_kernels.reference import allowed_keys, repeat_kv
from mitigation.methods.registry import Method, MethodError, Preset, param, register
from mitigation.seam.hooks import AttentionCall, Hook, StopAfter, StopForward
from mitigation.seam.recorder import AttentionRecorder
from mitigation.seam.request import Contribution, RequestContext


def magnifier_layer(n_layers: int) -> int:
    """The selection layer: the paper's 8 of 32 (START_FLEX_LAYER), floor(8L/32) for depth L (testbed 6: 1)."""
    return 8 * n_layers // 32


def select_cells(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """[S, N] head-summed attention of S rows to N image tokens -> [N] bool: per row min-max scaled to
    0..255, above `threshold`, united over the rows (a flat row selects nothing)."""
    lo = rows.amin(-1, keepdim=True)
    span = rows.amax(-1, keepdim=True) - lo
    scaled = torch.where(span > 0, (rows - lo) / span.clamp_min(1e-30) * 255.0, torch.zeros_like(rows))
    return (scaled > threshold).any(0)


def strongest_component(cells: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Lucid's `region=component`: of the selected [rows, cols] cells, the 4-connected group with the largest
    summed `score` (so scattered selections give one zoomable region, not a box around all of them)."""
    from scipy import ndimage

    labels, n = ndimage.label(cells)
    if n <= 1:
        return cells
    sums = ndimage.sum(score, labels, index=np.arange(1, n + 1))
    return labels == int(np.argmax(sums)) + 1


def cells_box(layout: Any, cells: np.ndarray) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) in ORIGINAL pixels covering the selected [rows, cols] cells, clipped."""
    r, c = np.nonzero(cells)
    boxes = [layout.cell_box(int(i), int(j)) for i, j in ((r.min(), c.min()), (r.max(), c.max()))]
    w, h = layout.geometry.original_size
    x0, y0 = max(0.0, boxes[0][0]), max(0.0, boxes[0][1])
    x1, y1 = min(float(w), boxes[1][2]), min(float(h), boxes[1][3])
    return (
        int(np.floor(x0)),
        int(np.floor(y0)),
        max(int(np.floor(x0)) + 1, int(np.ceil(x1))),
        max(int(np.floor(y0)) + 1, int(np.ceil(y1))),
    )


@dataclass(frozen=True)
class MagnifierView:
    """What the magnifier made for one row (in `Generation.extras["magnifier"]`).

    Attributes:
        cells: [rows, cols] bool, the selected coarse cells.
        box: (x0, y0, x1, y1) the crop in original pixels (None: nothing selected, nothing added).
        crop: the cropped full-resolution region the dense tokens come from (None with no selection).
        tokens: "image" or "keys".
        n_dense: dense tokens added.
        image_size: (width, height) of the original image (the frame of `box` and `mask`).
    """

    cells: np.ndarray
    box: tuple[int, int, int, int] | None
    crop: Image.Image | None
    tokens: str
    n_dense: int
    image_size: tuple[int, int]

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool: the crop box in the original image (what crop-quality measures read)."""
        size = self.image_size
        m = np.zeros((size[1], size[0]), dtype=bool)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            m[y0:y1, x0:x1] = True
        return m

    def panels(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = [("crop box", "box", self.box)]
        out.append((f"selected cells ({int(self.cells.sum())} of {self.cells.size})", "map", self.cells.astype(float)))
        if self.crop is not None:
            out.append((f"dense view ({self.tokens})", "image", self.crop))
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-able summary, with the crop box as a COCO RLE mask (for crop-quality measures)."""
        from grounding.segment import encode_rle

        return {
            "box": list(self.box) if self.box is not None else None,
            "mask": encode_rle(self.mask),
            "selected": int(self.cells.sum()),
            "cells": int(self.cells.size),
            "tokens": self.tokens,
            "n_dense": self.n_dense,
        }


class _Select:
    """The selection pass's own request: stop after the selection layer."""

    name = "magnifier.select"

    def __init__(self, layer: int, n_layers: int) -> None:
        self.layer, self.n_layers = layer, n_layers

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        return inputs

    def second_stream(self) -> None:
        return None

    def contribute(self, ctx: RequestContext) -> Contribution:
        return Contribution(hook=StopAfter(self.layer) if self.layer < self.n_layers - 1 else None)


class _DenseKeys(Hook):
    """Lucid's `tokens=keys`: the crop's dense tokens as extra keys / values of the text rows (module doc)."""

    def __init__(self, vlm: Any, layers: range, dense: torch.Tensor, parent_pos: torch.Tensor, text_from: torch.Tensor):
        self.attention_layers = frozenset(layers)
        self.vlm = vlm
        self.dense = dense  # [B, M, hidden] projector outputs (zeros where a row has no crop)
        self.parent_pos = parent_pos  # [B, M] RoPE positions of the parents
        self.valid = parent_pos >= 0  # [B, M]
        self.text_from = text_from  # [B] first padded position after the image
        self.n_main = int(dense.shape[0])
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _dense_kv(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._kv:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            block = self.vlm.text_model.layers[layer]
            attn = block.self_attn
            h = block.input_layernorm(self.dense)
            b, m, _ = h.shape
            hd = attn.head_dim
            k = attn.k_proj(h).view(b, m, -1, hd).transpose(1, 2)
            v = attn.v_proj(h).view(b, m, -1, hd).transpose(1, 2)
            cos, sin = self.vlm.text_model.rotary_emb(h, position_ids=self.parent_pos.clamp_min(0))
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            self._kv[layer] = (k.to(dtype), v.to(dtype))
        return self._kv[layer]

    def output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        b = self.n_main
        q = call.query[:b]  # [B, H, Tq, D]
        H, tq, tk = q.shape[1], q.shape[2], call.key.shape[2]
        kd, vd = self._dense_kv(call.layer, q.dtype)
        rep = H // kd.shape[1]
        kd, vd = repeat_kv(kd, rep), repeat_kv(vd, rep)
        k = repeat_kv(call.key[:b], H // call.key.shape[1])
        z = torch.matmul(q.float(), k.float().transpose(-1, -2)) * call.scale
        allowed = allowed_keys(call.mask, tq, tk, q.device)
        allowed = allowed[:b] if allowed.shape[0] > 1 else allowed
        lse_std = z.masked_fill(~allowed, float("-inf")).logsumexp(-1)  # [B, H, Tq]
        zd = torch.matmul(q.float(), kd.float().transpose(-1, -2)) * call.scale  # [B, H, Tq, M]
        zd = zd.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        q_pos = torch.arange(tk - tq, tk, device=q.device)
        text = q_pos[None, :] >= self.text_from[:, None]  # [B, Tq] instruction / answer rows
        lse_d = zd.logsumexp(-1)
        share = torch.sigmoid(lse_d - lse_std)  # exp-mass of the dense keys / all keys
        share = torch.where(text[:, None, :] & torch.isfinite(lse_d), share, torch.zeros_like(share))
        share = share.nan_to_num(0.0)
        pd = torch.softmax(zd, -1).nan_to_num(0.0)
        out_d = torch.matmul(pd, vd.float())  # [B, H, Tq, D]
        s = share.transpose(1, 2)[..., None]  # [B, Tq, H, 1]
        mixed = (1 - s) * out[:b].float() + s * out_d.transpose(1, 2)
        return torch.cat([mixed.to(out.dtype), out[b:]]) if out.shape[0] > b else mixed.to(out.dtype)

    def keep_rows(self, n: int) -> None:
        return None  # only the request's rows are touched


@register("magnifier")
@dataclass(frozen=True)
class Magnifier(Method):
    """LSceneLLM's scene magnifier in 2D: select the image cells the instruction attends to, encode a crop of
    them at full resolution, and let the answer see the dense tokens.

    Selection at a middle layer (the paper's 8 of 32; floor(8L/32) for depth L): the instruction rows'
    attention to the image tokens summed over heads, min-max scaled per row to 0..255, cells above 96
    (`rows=last`: the last prompt row only, the paper's "last text token"). The selected cells' box in
    original pixels is cropped from the full-resolution image and encoded by the vision tower and
    projector. `tokens=image`: the crop enters as a second image after the original; `tokens=keys`:
    extra keys / values in the layers after the selection layer, visible to instruction and answer rows,
    at their parent cells' RoPE positions, projected by each layer's own weights (LSceneLLM trains new
    projections and fine-tunes; this is training-free, see the module docstring).

    Presets. `official`: Hoyyyaard/LSceneLLM (the training cfgs `cfgs/XR-QA-*.yaml` and the magnifier's
    code): START_FLEX_LAYER 8, threshold 96 of 255, head-summed attention of every learnable text row, per
    row; the dense tokens as extra keys and values (`tokens=keys`, the code's mechanism). `paper`:
    arXiv:2412.01292 Sec. 3.2: the last text token's attention selects; otherwise the same.
    """

    looks_again: ClassVar[bool] = True  # one such method per request (`mitigation.seam.request`)
    paper: ClassVar[str] = (
        "Zhi et al. LSceneLLM: Enhancing Large 3D Scene Understanding Using Adaptive Visual Preferences. "
        "CVPR 2025, arXiv:2412.01292"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"threshold": 96.0, "rows": "instruction", "tokens": "keys"},
            "Hoyyyaard/LSceneLLM: cfgs/XR-QA-*.yaml (START_FLEX_LAYER 8, DENSE_TOKEN_NUM 4, threshold 96), the "
            "scene magnifier's selector (head-summed attention of each learnable text row to the sparse tokens, "
            "row min-max to 0..255, > 96) and adaptive self-attention (dense keys / values at the parents' "
            "positions, text rows only)",
        ),
        "paper": Preset(
            {"threshold": 96.0, "rows": "last", "tokens": "keys"},
            "arXiv:2412.01292 Sec. 3.2 (the last text token's attention selects the dense tokens) and Sec. 3.3; "
            "threshold 96 (Table 7's ablation: 10-20 % of tokens active)",
        ),
    }

    layer: int | None = param(None, "selection layer (default: floor(8L/32), the paper's 8 of 32)", min=0)
    threshold: float = param(96.0, "selection threshold on the row's 0..255 min-max scale", min=0.0, max=255.0)
    rows: str = param(
        "instruction", "rows that select: every instruction row (the code) or the last (the paper)",
        choices=("instruction", "last"),
    )  # fmt: skip
    tokens: str = param(
        "keys", "how the dense tokens enter: keys (extra keys / values, LSceneLLM's way) or image (a second image)",
        choices=("keys", "image"),
    )  # fmt: skip
    region: str = param(
        "box", "the crop: box (of every selected cell) or component (Lucid's: the strongest 4-connected group)",
        choices=("box", "component"),
    )  # fmt: skip

    def _layer(self, n_layers: int) -> int:
        layer = magnifier_layer(n_layers) if self.layer is None else self.layer
        if layer >= n_layers - 1:
            raise MethodError(
                f"magnifier: selection layer {layer} leaves no later layer of the {n_layers} to magnify "
                f"(valid: 0..{n_layers - 2})"
            )
        return layer

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        from vlm.inputs import build_inputs

        if not inputs.sources:
            raise MethodError("magnifier: the request's rows carry no source images (build them with vlm.build_inputs)")
        if vlm.kind != "llava":
            raise MethodError(f"magnifier: supported on LLaVA-1.5 checkpoints (a single image view), not {vlm.kind}")
        layer = self._layer(vlm.n_layers)
        views = self._select(vlm, inputs, layer)
        extras = tuple({**inputs.extras_of(b), self.name: v} for b, v in enumerate(views))
        if self.tokens == "keys":
            return replace(inputs, extras=extras)
        images = [(src.image, v.crop) if v.crop is not None else src.image for v, src in zip(views, inputs.sources)]
        srcs = inputs.sources
        out = build_inputs(vlm, images, [s.question for s in srcs], srcs[0].system, srcs[0].history)
        return replace(out, sources=srcs, extras=extras)

    def _select(self, vlm: Any, inputs: Any, layer: int) -> list[MagnifierView]:
        from vlm import SamplingParams, generate

        rec = AttentionRecorder(layers=[layer], prefill_rows="all")
        try:
            generate(
                vlm, inputs, SamplingParams(max_new_tokens=1), recorder=rec, methods=(_Select(layer, vlm.n_layers),)
            )
        except StopForward:
            pass
        att = rec.image_attention(layer).float().sum(1)  # [B, T, N] summed over heads
        T = inputs.input_ids.shape[1]
        views = []
        for b, (layout, src) in enumerate(zip(inputs.layouts, inputs.sources, strict=True)):
            start = max(layout.token_positions) + 1 if self.rows == "instruction" else T - 1
            n = layout.n_tokens
            rows = att[b, start:T, :n]
            cells = select_cells(rows, self.threshold).reshape(layout.grid).cpu().numpy()
            if self.region == "component" and cells.any():
                cells = strongest_component(cells, rows.mean(0).reshape(layout.grid).cpu().numpy())
            if not cells.any():
                views.append(MagnifierView(cells, None, None, self.tokens, 0, src.image.size))
                continue
            box = cells_box(layout, cells)
            crop = src.image.crop(box)
            views.append(MagnifierView(cells, box, crop, self.tokens, n, src.image.size))
        return views

    def contribute(self, ctx: RequestContext) -> Contribution:
        if self.tokens != "keys":
            return Contribution()
        vlm, inputs = ctx.vlm, ctx.inputs
        layer = self._layer(ctx.n_layers)
        views = [inputs.extras_of(b)[self.name] for b in range(ctx.n_main)]
        crops = [v.crop for v in views if v.crop is not None]
        hidden = vlm.model.config.text_config.hidden_size
        n = inputs.layouts[0].n_tokens
        dense = torch.zeros(ctx.n_main, n, hidden, device=ctx.device, dtype=vlm.dtype)
        parent = torch.full((ctx.n_main, n), -1, dtype=torch.long, device=ctx.device)
        if crops:
            feats = _encode(vlm, crops)  # [C, n, hidden]
            pad = (inputs.attention_mask == 0).sum(-1)  # left padding per row
            k = 0
            for b, v in enumerate(views):
                if v.crop is None:
                    continue
                dense[b] = feats[k].to(dense.dtype)
                parent[b] = _parents(vlm, inputs.layouts[b], v.box, v.crop.size, ctx.device) - pad[b]
                k += 1
        text_from = torch.tensor([max(lay.token_positions) + 1 for lay in inputs.layouts], device=ctx.device)
        return Contribution(hook=_DenseKeys(vlm, range(layer + 1, ctx.n_layers), dense, parent, text_from))


def _encode(vlm: Any, crops: list[Image.Image]) -> torch.Tensor:
    """The crops through the checkpoint's processor, vision tower and projector: [C, tokens, hidden]."""
    pix = vlm.processor.image_processor(images=crops, return_tensors="pt")["pixel_values"].to(vlm.device, vlm.dtype)
    cfg = vlm.model.config
    with torch.inference_mode():
        out = vlm.model.model.get_image_features(
            pixel_values=pix,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
    feats = out.pooler_output if hasattr(out, "pooler_output") and not torch.is_tensor(out) else out
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


def _parents(vlm: Any, layout: Any, box: tuple[int, int, int, int], crop_size: tuple[int, int], device) -> torch.Tensor:
    """[M] padded positions of each dense token's parent: the original view's cell under the dense cell's
    centre (the nearest seen cell where the processor cropped it away)."""
    from vlm.inputs import image_geometry

    geom = image_geometry(vlm, crop_size)
    p = layout.patch_size
    rows, cols = layout.grid  # the crop is encoded at the same input size: the same grid
    centres = np.array([[(c + 0.5) * p, (r + 0.5) * p] for r in range(rows) for c in range(cols)])
    xy = geom.to_original(centres) + np.array([box[0], box[1]])  # crop pixels -> original pixels
    proc = layout.geometry.to_processed(xy)
    col = np.clip(np.floor(proc[:, 0] / p).astype(int), 0, layout.grid[1] - 1)
    row = np.clip(np.floor(proc[:, 1] / p).astype(int), 0, layout.grid[0] - 1)
    pos = np.asarray(layout.token_positions)[row * layout.grid[1] + col]
    return torch.as_tensor(pos, dtype=torch.long, device=device)
