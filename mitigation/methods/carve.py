"""CARVE (arXiv 2509.06461): contrast the attention of the question with that of a general instruction,
mask and crop the image to where the question looks, and answer from the refined image.

The pipeline (`Carve.prepare_inputs`, before the request's own prefill):

1. **capture**: a question pass and a general-instruction pass ("Write a general description of the
   image.") are decoded greedily with the KV cache; the recorder keeps, at the chosen layers, only the
   head-averaged image-attention row of the position that predicts the next token (never a full matrix).
   Each pass is one batch over the request's rows (the general rows: one per distinct image, without the
   conversation); the general pass depends on the image only, so its rows are cached per
   (checkpoint, image) and a second question about an image pays for the question pass alone. With
   `steps=first` only the prefill is read and it stops after the last layer read (`StopAfter`).
2. **contrast and fuse** (`contrast_fuse`): A_Q / (A_G + lambda) per layer and step, summed over layers,
   steps paired by index and weighted w_t = t + 1 (`steps=all`; `first` / `last`: one step).
3. **into original pixels**: the fused [rows, cols] map is resized bilinearly onto the ORIGINAL image
   through the processor's geometry (`ImageLayout.to_original_map`), so a centre crop or padding is
   undone exactly; pixels the model never saw are never kept.
4. **select** (`select_regions`): keep the top-p pixels, label their 4-connected components
   (`scipy.ndimage.label`), rank them by summed map, keep K = max(k, floor(0.2 n)) (the code) or at most
   k (the paper), then black out everything else, crop to the kept mask's box and upscale with Lanczos by
   max(W/w, H/h) (`refine_image`).
5. **answer**: the request's rows are rebuilt with the original and the refined image (`final=both`, the
   official code) or the refined image only (`final=refined`, the paper), the question unchanged but for
   the official answer suffix.

What the method made for each row (`CarveView`: the fused map, the mask, the box, the refined image) is
in `Generation.extras["carve"]`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mitigation.methods.registry import Method, MethodError, Preset, param, register, resolve_layers
from mitigation.seam.hooks import StopAfter, StopForward
from mitigation.seam.recorder import AttentionRecorder
from mitigation.seam.request import Contribution, RequestContext
from vlm.images import zoom_to_cover

GENERAL_INSTRUCTION = "Write a general description of the image."
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
STEPS = ("all", "first", "last")


def carve_layers(n_layers: int) -> list[int]:
    """The paper's layers 20..25 ("[20, 25]", used for every backbone it ran: 28 to 40 layers); on a
    backbone of fewer than 26 layers the same fraction of the depth, floor(20L/32)..floor(25L/32)
    (the testbed's 6: 3, 4)."""
    if n_layers >= 26:
        return list(range(20, 26))
    return list(range(20 * n_layers // 32, 25 * n_layers // 32 + 1))


def contrast_fuse(question: torch.Tensor, general: torch.Tensor | None, lam: float, steps: str) -> torch.Tensor:
    """The fused contrast map over the image tokens.

    Args:
        question: [layers, Sq, N] head-averaged attention of the question pass's predicting rows (Sq steps).
        general: [layers, Sg, N] the same for the general pass, or None (no contrast: the map is A_Q).
        lam: the contrast's stabiliser lambda.
        steps: "all" (steps paired by index up to the shorter pass, weight t + 1), "first" (step 0 of each),
            "last" (each pass's last step).
    Returns:
        [N] float64: sum over the chosen steps and layers of w_t * A_Q / (A_G + lam).
    """
    q = question.double()
    g = None if general is None else general.double()
    if steps == "all":
        n = q.shape[1] if g is None else min(q.shape[1], g.shape[1])
        qs, gs = q[:, :n], None if g is None else g[:, :n]
        w = torch.arange(1, n + 1, dtype=torch.float64)
    elif steps == "first":
        qs, gs, w = q[:, :1], None if g is None else g[:, :1], torch.ones(1, dtype=torch.float64)
    elif steps == "last":
        qs, gs, w = q[:, -1:], None if g is None else g[:, -1:], torch.ones(1, dtype=torch.float64)
    else:
        raise ValueError(f"steps must be one of {', '.join(STEPS)}, got {steps!r}")
    ratio = qs if gs is None else qs / (gs + lam)
    return (ratio * w[None, :, None]).sum(dim=(0, 1))


def select_regions(score: np.ndarray, top_p: float, k: int, k_rule: str) -> tuple[np.ndarray, int, int]:
    """The kept mask of an [H, W] map (NaN: pixels the model never saw, never kept).

    Threshold at the value keeping the top `top_p` of the seen pixels, label the 4-connected components,
    rank them by summed score and keep K: "at_least" max(k, floor(0.2 n)) (the official code), "at_most"
    min(k, n) (the paper). Returns (mask [H, W] bool, components kept, components found).
    """
    from scipy import ndimage

    seen = ~np.isnan(score)
    if not seen.any():
        return np.zeros(score.shape, dtype=bool), 0, 0
    values = np.where(seen, score, -np.inf)
    tau = np.quantile(score[seen], 1.0 - top_p)
    labels, n = ndimage.label(seen & (values >= tau))
    if n == 0:
        return np.zeros(score.shape, dtype=bool), 0, 0
    sums = ndimage.sum(np.where(seen, score, 0.0), labels, index=np.arange(1, n + 1))
    keep_n = max(k, int(np.floor(0.2 * n))) if k_rule == "at_least" else k
    kept = np.argsort(-np.asarray(sums), kind="stable")[: min(keep_n, n)] + 1
    return np.isin(labels, kept), int(len(kept)), int(n)


def refine_image(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Black out the pixels outside `mask`, crop to its box and upscale with Lanczos by max(W/w, H/h), so the
    crop covers the original size, aspect kept (one side may exceed it). Returns (image, box x0 y0 x1 y1)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    arr = np.asarray(image.convert("RGB")).copy()
    arr[~mask] = 0
    return zoom_to_cover(Image.fromarray(arr[y0:y1, x0:x1]), image.size), (x0, y0, x1, y1)


def image_key(image: Image.Image) -> str:
    """A decoded image's identity: sha256 of its mode, size and pixels."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class _GeneralCache:
    """The general pass's recorded rows, per (checkpoint, image, settings): [layers, S, N] on the CPU.
    Bounded (least recently used out), shared by the threads of a process."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._data: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return None

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


GENERAL_CACHE = _GeneralCache()


@dataclass(frozen=True)
class CarveView:
    """What CARVE made for one row (in `Generation.extras["carve"]`).

    Attributes:
        map: [H, W] float32 fused map in original-image pixels (NaN where the model saw nothing).
        mask: [H, W] bool, the kept regions.
        box: (x0, y0, x1, y1) the kept mask's box in original pixels (None: nothing kept, the image as is).
        refined: the image the answer pass saw (masked, cropped, upscaled).
        regions: (kept, found) connected components.
        steps: (question, general) capture steps read.
        general_cached: the general pass's rows came from the cache.
        attention: "contrast" (the paper's) or "heads" (Lucid's: the localization heads' map).
    """

    map: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int] | None
    refined: Image.Image
    regions: tuple[int, int]
    steps: tuple[int, int]
    general_cached: bool
    attention: str

    def panels(self) -> list[tuple[str, str, Any]]:
        """For pictures (`lucid.heatmap.views_figure`): the kept box, the fused map, the mask, the refined image."""
        name = "contrast map" if self.attention == "contrast" else "heads map"
        return [
            ("kept box", "box", self.box),
            (name, "map", self.map),
            (f"kept mask ({self.regions[0]} of {self.regions[1]} regions)", "mask", self.mask),
            ("refined image", "image", self.refined),
        ]

    def to_record(self) -> dict[str, Any]:
        """JSON-able summary, with the mask as COCO RLE (for crop-quality measures)."""
        from grounding.segment import encode_rle

        return {
            "box": list(self.box) if self.box is not None else None,
            "mask": encode_rle(self.mask),
            "kept_fraction": round(float(self.mask.mean()), 6),
            "regions": list(self.regions),
            "steps": list(self.steps),
            "general_cached": self.general_cached,
            "attention": self.attention,
            "refined_size": list(self.refined.size),
        }


class _Capture:
    """The capture passes' own request: nothing but a stop after the last layer read (prefill only)."""

    name = "carve.capture"

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        return inputs

    def second_stream(self) -> None:
        return None

    def contribute(self, ctx: RequestContext) -> Contribution:
        return Contribution(hook=StopAfter(self.stop_after) if self.stop_after is not None else None)


def _with_suffix(question: str, suffix: bool) -> str:
    if not suffix or question.rstrip().endswith(ANSWER_SUFFIX):
        return question
    return f"{question}\n{ANSWER_SUFFIX}"


def _n_steps(gen: Any) -> int:
    """Steps a pass recorded for its row: one per chosen token, its eos included."""
    return len(gen.token_ids) + (1 if gen.finish_reason == "eos" else 0)


@register("carve")
@dataclass(frozen=True)
class Carve(Method):
    """CARVE: contrast question attention with a general instruction's, mask and zoom, answer again.

    Three passes: a question pass and a general-instruction pass record the head-averaged attention of the
    predicting row over the image tokens at the layers read (KV cache, image rows only; the general pass
    cached per image); A_Q / (A_G + lambda) fused over layers and time-weighted steps is resized onto the
    original image through the processor's geometry, thresholded to the top-p pixels, split into
    4-connected components ranked by attention sum (K kept), and the image outside them blacked out,
    cropped to their box and upscaled (Lanczos); the answer pass sees the refined image (with the original
    before it under `final=both`). `attention=heads` (Lucid's) takes the map from the checkpoint's
    localization heads in the question pass instead of the contrast, for a model whose answer row does
    not look at the object. Composes with single-pass methods (they act on the answer pass only).

    Layers: the paper's 20..25 on backbones of 26 layers or more; shallower, floor(20L/32)..floor(25L/32).

    Presets. `official`: YuyaoGe/CARVE (`carve/attention.py`, `carve/masking.py`, `carve/pipeline.py`,
    version v4, the default of `main.py`): layers range(20, 26), all steps fused with weight step + 1 paired
    by index, lambda 1e-8, top 20 % of pixels, K = max(3, floor(0.2 n)) ranked by attention sum, black
    background, final prompt [original, refined], capture and answer 32 new tokens, the suffix "Answer the
    question using a single word or phrase." on all three passes. `paper`: arXiv:2509.06461 Alg. 1 and
    Sec. 4-5: the refined image alone in the final pass (Eq. 5, M(I_refined, Q)), at most K = 3 regions
    (Sec. 5.4's best K in {2, 3}), no suffix (the paper names none); lambda stays 1e-8 (App. B's "0.05" names
    no symbol), layers [20, 25] (Tables 1-2) and T_full fusion (Alg. 1) as in the code.
    """

    looks_again: ClassVar[bool] = True  # one such method per request (`mitigation.seam.request`)
    paper: ClassVar[str] = (
        "Ge et al. Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning. arXiv:2509.06461"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"final": "both", "k_rule": "at_least", "suffix": True, "steps": "all", "lam": 1e-8, "top_p": 0.2, "k": 3},
            "YuyaoGe/CARVE: carve/pipeline.py (three passes, [original, refined] in the final prompt, the answer "
            "suffix on every pass, max_new_tokens 32), carve/attention.py (v4: all steps, weight step + 1, "
            "lambda 1e-8, layers range(20, 26)), carve/masking.py (top_percent 0.2, min_keep_regions 3, "
            "K = max(3, floor(0.2 n)) by attention sum, black background, LANCZOS by max(W/w, H/h))",
        ),
        "paper": Preset(
            {"final": "refined", "k_rule": "at_most", "suffix": False},
            "arXiv:2509.06461: Alg. 1 and Eq. 5 (the answer from the refined image only), Sec. 5.4 (K regions at "
            "most, best K in {2, 3}); no answer suffix is named",
        ),
    }

    attention: str = param(
        "contrast",
        "where the map comes from: contrast (the paper's A_Q / (A_G + lambda)) or heads (Lucid's: the "
        "checkpoint's localization heads in the question pass)",
        choices=("contrast", "heads"),
    )
    layers: tuple[int, ...] | None = param(
        None, "layers read (default: 20..25, or floor(20L/32)..floor(25L/32))", min=0
    )
    steps: str = param("all", "capture steps fused: all (weight t + 1), first, last", choices=STEPS)
    lam: float = param(1e-8, "the contrast's stabiliser lambda in A_Q / (A_G + lambda)", min=0.0, max=10.0)
    top_p: float = param(0.2, "fraction of the seen pixels above the threshold (1 = no masking)", min=1e-4, max=1.0)
    k: int = param(3, "regions kept: at least / at most k (see k_rule)", min=1, max=1000)
    k_rule: str = param(
        "at_least",
        "at_least: max(k, floor(0.2 n)) (the code); at_most: min(k, n) (the paper)",
        choices=("at_least", "at_most"),
    )
    final: str = param(
        "both",
        "the answer pass's images: both (original, then refined: the code) or refined (the paper)",
        choices=("both", "refined"),
    )
    suffix: bool = param(True, "append the answer suffix to the question on all three passes (the code)")
    capture_tokens: int = param(32, "new tokens decoded by each capture pass (eos ends it sooner)", min=1, max=512)
    cache: bool = param(True, "reuse the general pass's recording of an image already seen")

    def contribute(self, ctx: RequestContext) -> Contribution:
        return Contribution()

    # -- the pipeline ------------------------------------------------------------------------------------
    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        from vlm.inputs import build_inputs

        if not inputs.sources:
            raise MethodError("carve: the request's rows carry no source images (build them with vlm.build_inputs)")
        if vlm.kind != "llava":
            raise MethodError(f"carve: supported on LLaVA-1.5 checkpoints (a single image view), not {vlm.kind}")
        maps, steps, cached = self._maps(vlm, inputs)
        images, questions, extras = [], [], []
        for b, src in enumerate(inputs.sources):
            layout = inputs.layouts[b]
            grid = maps[b].reshape(layout.grid).cpu().numpy()
            score = layout.to_original_map(grid, interpolation="bilinear")
            mask, kept, found = select_regions(score, self.top_p, self.k, self.k_rule)
            if kept:
                refined, box = refine_image(src.image, mask)
            else:
                refined, box = src.image, None
            view = CarveView(
                score.astype(np.float32), mask, box, refined, (kept, found), steps[b], cached[b], self.attention
            )
            images.append((src.image, refined) if self.final == "both" else refined)
            questions.append(_with_suffix(src.question, self.suffix))
            extras.append({**inputs.extras_of(b), self.name: view})
        system, history = inputs.sources[0].system, inputs.sources[0].history
        out = build_inputs(vlm, images, questions, system, history)
        return replace(out, sources=inputs.sources, extras=tuple(extras))

    def _layers(self, vlm: Any) -> tuple[int, ...]:
        return resolve_layers(self.name, self.layers, carve_layers(vlm.n_layers), vlm.n_layers)

    def _maps(self, vlm: Any, inputs: Any) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[bool]]:
        """Per row: the [N] fused map, (question, general) steps read, and whether the general rows were cached."""
        from vlm import SamplingParams, build_inputs, generate

        srcs = inputs.sources
        if self.attention == "heads":
            from grounding.heads import load_or_discover

            heads = load_or_discover(vlm).heads
            layers = tuple(sorted({layer for layer, _ in heads}))
        else:
            heads, layers = None, self._layers(vlm)
        first = self.steps == "first"
        # rows to capture: every question, then one general row per image not in the cache
        general_key = (vlm.weights_hash(), layers, self.capture_tokens if not first else 1, self.suffix)
        keys = [image_key(s.image) for s in srcs]
        general: dict[str, torch.Tensor | None] = {}
        for key in keys:
            general.setdefault(key, GENERAL_CACHE.get((*general_key, key)) if self.cache else None)
        cached = [general[key] is not None for key in keys]
        if heads is not None:
            cached = [False] * len(keys)
        todo = [] if heads is not None else [key for key, v in general.items() if v is None]
        first_of = {key: keys.index(key) for key in todo}
        images = [s.image for s in srcs] + [srcs[first_of[key]].image for key in todo]
        texts = [_with_suffix(s.question, self.suffix) for s in srcs]
        texts += [_with_suffix(GENERAL_INSTRUCTION, self.suffix)] * len(todo)
        reduce = None if heads is not None else "mean"
        sampling = SamplingParams(max_new_tokens=1 if first else self.capture_tokens)
        # the question rows keep the request's conversation; the general rows are the image alone
        q_inputs = build_inputs(vlm, images[: len(srcs)], texts[: len(srcs)], srcs[0].system, srcs[0].history)
        rows = [(q_inputs, len(srcs))]
        if todo:
            rows.append((build_inputs(vlm, images[len(srcs) :], texts[len(srcs) :]), len(todo)))
        recorded: list[torch.Tensor] = []  # per capture row: [layers, H|1, S, N]
        n_steps: list[int] = []
        for cap_inputs, n in rows:
            rec = AttentionRecorder(layers=layers, prefill_rows="last", reduce_heads=reduce)
            stop = _Capture(max(layers) if first and max(layers) < vlm.n_layers - 1 else None)
            try:
                gens = generate(vlm, cap_inputs, sampling, recorder=rec, methods=(stop,))
                n_steps += [_n_steps(g) for g in gens]
            except StopForward:
                n_steps += [1] * n
            att = torch.stack([rec.image_attention(layer) for layer in layers])  # [L, R, H|1, S, N]
            recorded += [att[:, r] for r in range(n)]
        out_maps, out_steps = [], []
        for b in range(len(srcs)):
            q = recorded[b][..., : n_steps[b], :]  # [L, H|1, Sq, N]
            if heads is not None:
                out_maps.append(_heads_map(q, layers, heads))
                out_steps.append((n_steps[b], 0))
                continue
            key = keys[b]
            if general[key] is None:
                j = len(srcs) + todo.index(key)
                g = recorded[j][:, 0, : n_steps[j], :].float().cpu()
                general[key] = g
                if self.cache:
                    GENERAL_CACHE.put((*general_key, key), g)
            g = general[key]
            out_maps.append(contrast_fuse(q[:, 0].float().cpu(), g, self.lam, self.steps))
            out_steps.append((int(q.shape[-2]), int(g.shape[1])))
        return out_maps, out_steps, cached


def _heads_map(q: torch.Tensor, layers: tuple[int, ...], heads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Lucid's `attention=heads`: per localization head its image attention averaged over the question
    pass's steps and normalised to sum 1, averaged over the heads. q: [layers, H, S, N]."""
    acc = None
    for layer, head in heads:
        row = q[layers.index(layer), head].double().mean(0)
        row = row / row.sum().clamp_min(1e-12)
        acc = row if acc is None else acc + row
    return acc / len(heads)
