"""READ's Similarity-as-Points (SasP), training-free on any llava-hf checkpoint (`--method read`).

Qian, Yin, Dou, "Reasoning to Attend: Try to Understand How <SEG> Token Works", CVPR 2025 (rui-qian/READ
@2549240, model/READ.py; spec: research notes §2). One prefill captures a hidden state (the project's
hidden-state capture: `AttentionRecorder(hidden_layers=...)`, index L = the post-final-norm output, as
transformers' `hidden_states[-1]`); the dot product of one token's state with every image token's state
is the similarity map; the map becomes SAM points:

1. S_j = <h_img_j, h_tok> (raw dot product), as the [rows, cols] base-view grid;
2. bilinear downsampling by `down_sample` (2 for READ-7B), then min-max normalisation to [0, 1] over the
   cells whose centre lies on the original image (a padded layout's padding cells are excluded, like the
   official code's -1 padding outside the centre crop);
3. positives s >= t_pos (descending), negatives 0 <= s <= t_neg (ascending), the rest neutral; the first
   `num_points` of [positives, negatives, neutrals] are kept (the official cap), neutral ones are not sent
   (SAM's stock predictors take labels 0 / 1 only; READ's -1 is SAM's "not a point");
4. cell centre -> ORIGINAL pixel through the processor's geometry (`ImageLayout`), truncated to a pixel;
5. DtoC (`dtoc`): p' = sum_i w_i g_i, w_i ~ exp(-|g_i - p|^2) softmax(M)_i over the pixels g_i of the
   map painted bilinearly onto the original image, min-max over the image's pixels (0 where the processor
   cropped or padded: READ's zero padding), summed over a
   +-8 px window (exp(-64) of the rest is below float precision);
6. SAM with those points, `multimask` as the official code (False).

Which token stands in for READ's trained `[SEG]` is `token`: "seg" (the row whose next-token prediction is
`seg_token`, found by greedy generation: the official index arithmetic), "target" (the mean of the query's
word tokens without the article), "last" (the last prompt token); "auto" = "seg" when the tokenizer has
`seg_token` as one token, else "last" (chosen on the testbed's calibration scenes, docs/grounding.md).
`layer` picks another hidden-state index (transformers' `hidden_states[layer]` convention) instead of the last.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grounding.options import PresetOptions, parse_options

TOKENS = ("auto", "seg", "target", "last")
THRESHOLDS = ("minmax", "sigma")
# LISA's first SHORT_QUESTION template (READ's training / eval questions), with the phrase's own article
OFFICIAL_PROMPT = "Can you segment {query} in this image?"
_ARTICLES = ("the ", "a ", "an ")
_DTOC_WINDOW = 8


@dataclass(frozen=True)
class ReadParams(PresetOptions):
    """SasP's parameters. `preset`: "official" (READ's code, model/READ.py and the READ-7B scripts) or
    "paper" (the paper's text where it differs: thresholds at mean +- eps * std); explicit values override it.

    Attributes:
        token: which token's state is READ's `[SEG]` (module doc): auto | seg | target | last (Lucid's).
        layer: hidden-state index (-1: the last, post-norm: official); 0..L as transformers' `hidden_states`.
        prompt: question template with "{query}" (official: LISA's template).
        down_sample: bilinear downsampling factor of the grid (official: 2, READ-7B).
        threshold: "minmax" (official: t_pos / t_neg on the min-max map) or "sigma" (paper: mean +- eps std).
        t_pos, t_neg: thresholds of "minmax" (official 0.8 / 0.2).
        eps: the "sigma" rule's multiple of the standard deviation (paper 0.5).
        num_points: cap on [positives, negatives, neutrals] (official 30, READ-7B).
        dtoc: Discrete-to-Continuous refinement of the points (official: on).
        multimask: SAM's multimask_output (official False); the best-scored mask is taken.
        seg_token: the segmentation token's text (token="seg"/"auto").
        max_new_tokens: greedy steps allowed before `seg_token` must appear (token="seg").
    """

    preset: str = "official"
    token: str = "auto"
    layer: int = -1
    prompt: str = OFFICIAL_PROMPT
    down_sample: int = 2
    threshold: str = "minmax"
    t_pos: float = 0.8
    t_neg: float = 0.2
    eps: float = 0.5
    num_points: int = 30
    dtoc: bool = True
    multimask: bool = False
    seg_token: str = "[SEG]"
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.token not in TOKENS:
            raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {self.token!r}")
        if self.prompt.count("{query}") != 1:
            raise ValueError(f"prompt must contain '{{query}}' exactly once, got {self.prompt!r}")
        if self.down_sample < 1:
            raise ValueError(f"down_sample must be >= 1, got {self.down_sample}")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {self.threshold!r}")
        if not 0 <= self.t_neg < self.t_pos <= 1:
            raise ValueError(f"need 0 <= t_neg < t_pos <= 1, got t_neg={self.t_neg}, t_pos={self.t_pos}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if not self.seg_token:
            raise ValueError("seg_token must be non-empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return PRESETS


# the paper's thresholds (pos S >= mu + 0.5 sigma, neg S <= mu - 0.5 sigma); everything else as the code
PRESETS: dict[str, dict] = {"official": {}, "paper": {"threshold": "sigma", "eps": 0.5}}


def parse_read(spec: str) -> ReadParams:
    """'read' or 'read:k=v,...' (e.g. 'read:token=last,layer=3', 'read:preset=paper') -> ReadParams.

    Raises:
        ValueError: another method name, an unknown option, or a bad value (the message names it).
    """
    return parse_options(spec, "read", ReadParams)


@dataclass(frozen=True)
class SasPPoints:
    """The point rule's result on one map.

    Attributes:
        cells: [h, w] the downsampled, min-max-normalised map (NaN: a cell off the image).
        points: (x, y, label) of the kept points in ORIGINAL pixels (label 1 / 0 / -1 neutral), in
            [positives, negatives, neutrals] order, after DtoC when on.
        cell_index: (row, col) of each kept point's cell in `cells`.
    """

    cells: np.ndarray = field(repr=False)
    points: tuple[tuple[float, float, int], ...]
    cell_index: tuple[tuple[int, int], ...]

    def sam_points(self) -> tuple[tuple[tuple[float, float], ...], tuple[int, ...]]:
        """The positive and negative points (neutrals dropped) as SamPrompt's (points, labels)."""
        kept = [(x, y, lab) for x, y, lab in self.points if lab in (0, 1)]
        return tuple((x, y) for x, y, _ in kept), tuple(lab for *_, lab in kept)


def similarity_points(sim: np.ndarray, view, params: ReadParams = ReadParams()) -> SasPPoints:
    """SasP's point rule (module doc, steps 2-5) on a [rows, cols] similarity grid of `view` (an ImageView:
    grid, patch size, geometry)."""
    import torch
    import torch.nn.functional as F

    sim = np.asarray(sim, dtype=np.float64)
    rows, cols = view.grid
    if sim.shape != (rows, cols):
        raise ValueError(f"similarity shape {sim.shape} does not match the grid {view.grid}")
    d = params.down_sample
    h, w = max(1, rows // d), max(1, cols // d)
    g = torch.from_numpy(sim)[None, None]
    if (h, w) != (rows, cols):
        g = F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
    cells = g[0, 0].numpy().copy()
    # cell centres in processed pixels, then original pixels
    p = view.patch_size
    cy, cx = np.mgrid[0:h, 0:w]
    centre = np.stack([(cx + 0.5) * cols * p / w, (cy + 0.5) * rows * p / h], -1)
    orig = view.geometry.to_original(centre)  # [h, w, 2]
    W, H = view.geometry.original_size
    on = (orig[..., 0] >= 0) & (orig[..., 0] < W) & (orig[..., 1] >= 0) & (orig[..., 1] < H)
    vals = cells[on]
    lo, hi = float(vals.min()), float(vals.max())
    norm = (cells - lo) / (hi - lo) if hi > lo else np.zeros_like(cells)
    norm[~on] = np.nan
    if params.threshold == "minmax":
        t_pos, t_neg = params.t_pos, params.t_neg
    else:
        mu, sd = float(np.nanmean(norm)), float(np.nanstd(norm))
        t_pos, t_neg = mu + params.eps * sd, mu - params.eps * sd
    flat = norm.ravel()
    idx = np.flatnonzero(on.ravel())
    pos = idx[flat[idx] >= t_pos]
    pos = pos[np.argsort(-flat[pos], kind="stable")]
    neg = idx[(flat[idx] >= 0) & (flat[idx] <= t_neg) & ~np.isin(idx, pos)]
    neg = neg[np.argsort(flat[neg], kind="stable")]
    rest = idx[~np.isin(idx, pos) & ~np.isin(idx, neg)]
    if len(pos) == 0:  # a flat map: the hottest cell stays the one positive
        pos = idx[[int(np.argmax(flat[idx]))]]
        neg, rest = neg[neg != pos[0]], rest[rest != pos[0]]
    ranked = [(int(k), 1) for k in pos] + [(int(k), 0) for k in neg] + [(int(k), -1) for k in rest]
    ranked = ranked[: params.num_points]
    full = None
    if params.dtoc:  # the map at full resolution, min-max over the image's own pixels, 0 off the image
        painted = view.to_original_map(sim, "bilinear")
        seen = ~np.isnan(painted)
        full = np.zeros_like(painted)
        full[seen] = _minmax(painted[seen])
    points, cell_index = [], []
    for k, lab in ranked:
        r, c = divmod(k, w)
        x = int(min(max(orig[r, c, 0], 0.0), W - 1))
        y = int(min(max(orig[r, c, 1], 0.0), H - 1))
        fx, fy = dtoc(full, x, y) if full is not None else (float(x), float(y))
        points.append((fx, fy, lab))
        cell_index.append((r, c))
    return SasPPoints(norm, tuple(points), tuple(cell_index))


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float64)


def dtoc(full: np.ndarray, x: int, y: int) -> tuple[float, float]:
    """DtoC on pixel (x, y): sum_i w_i g_i, w_i ~ exp(-|g_i - p|^2) * softmax(full)_i (the softmax's
    normaliser cancels), over a +-8 px window of the [H, W] map `full`."""
    H, W = full.shape
    r = _DTOC_WINDOW
    y0, y1, x0, x1 = max(0, y - r), min(H, y + r + 1), max(0, x - r), min(W, x + r + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    logw = -((xs - x) ** 2 + (ys - y) ** 2) + full[y0:y1, x0:x1]
    wgt = np.exp(logw - logw.max())
    wgt /= wgt.sum()
    return float((wgt * xs).sum()), float((wgt * ys).sum())


@dataclass(frozen=True)
class ReadResult:
    """One query's SasP: the map, the points, and which token / layer gave them.

    Attributes:
        query: the phrase.
        values: [rows, cols] the min-max-normalised similarity map (base view), for overlays.
        sas: the point rule's result.
        token: the token rule used ("seg", "target" or "last", after "auto").
        positions: the input positions whose states were used (seg: the row predicting seg_token).
        layer: the hidden-state index used (0..L).
        layout: the row's ImageLayout.
    """

    query: str
    values: np.ndarray = field(repr=False, compare=False)
    sas: SasPPoints = field(repr=False, compare=False)
    token: str
    positions: tuple[int, ...]
    layer: int
    layout: object = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "token": self.token,
            "layer": self.layer,
            "positions": list(self.positions),
            "points": [[round(x, 2), round(y, 2), lab] for x, y, lab in self.sas.points],
            "map": {"grid": list(self.values.shape), "values": np.round(self.values, 6).tolist()},
        }


def check_layer(layer: int, n_layers: int) -> None:
    """Raise ValueError unless `layer` names one of a model's n_layers + 1 hidden states."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer {layer} is outside the model's hidden states (-{n_layers + 1}..{n_layers})")


def seg_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one token (LISA / READ add "[SEG]"), else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if tid is None or tid == tokenizer.unk_token_id and text != tokenizer.unk_token:
        return None
    return int(tid) if tokenizer.convert_ids_to_tokens(int(tid)) == text else None


def _target_span(question: str, query: str, template: str) -> tuple[int, int]:
    start = template.index("{query}")
    low = query.lower()
    skip = next((len(a) for a in _ARTICLES if low.startswith(a) and len(query) > len(a)), 0)
    return start + skip, start + len(query)


def read_batch(vlm, images: Sequence, queries: Sequence[str], params: ReadParams = ReadParams()) -> list[ReadResult]:
    """SasP for (image, query) pairs in one forward pass (greedy generation for token="seg")."""
    import torch

    from grounding.readout import phrase_positions
    from mitigation import AttentionRecorder
    from vlm import SamplingParams, build_inputs, generate

    if len(images) != len(queries):
        raise ValueError(f"{len(images)} images but {len(queries)} queries")
    L = vlm.n_layers
    check_layer(params.layer, L)
    index = params.layer % (L + 1)
    token = params.token
    seg_id = seg_token_id(vlm.processor.tokenizer, params.seg_token)
    if token == "auto":
        token = "seg" if seg_id is not None else "last"
    if token == "seg" and seg_id is None:
        raise ValueError(f"token=seg: the tokenizer has no single token {params.seg_token!r}")
    queries = [q.strip() for q in queries]
    questions = [params.prompt.replace("{query}", q) for q in queries]
    inputs = build_inputs(vlm, list(images), questions)
    T = inputs.input_ids.shape[1]
    rec = AttentionRecorder(layers=[], hidden_layers=[index], hidden_rows="all")
    steps = params.max_new_tokens if token == "seg" else 1
    gens = generate(vlm, inputs, SamplingParams(max_new_tokens=steps), recorder=rec)
    hidden = rec.hidden_states(index)  # [B, T + steps - 1, D]
    out = []
    for b, q in enumerate(queries):
        lay = inputs.layouts[b]
        if token == "last":
            pos = (T - 1,)
        elif token == "target":
            pos = phrase_positions(vlm, inputs.input_ids[b], questions[b], _target_span(questions[b], q, params.prompt))
        else:
            ids = list(gens[b].token_ids)
            if seg_id not in ids:
                raise ValueError(f"token=seg: the model did not generate {params.seg_token!r} for {q!r}")
            pos = (T - 1 + ids.index(seg_id),)  # the row whose next-token prediction is seg_token
        h_tok = hidden[b, list(pos)].float().mean(0)
        h_img = hidden[b, list(lay.token_positions)].float()
        sim = (h_img @ h_tok).reshape(lay.grid).cpu().numpy().astype(np.float64)
        sas = similarity_points(sim, lay, params)
        out.append(ReadResult(q, _minmax(sim), sas, token, tuple(int(p) for p in pos), index, lay))
        del h_tok, h_img
    del hidden
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def read_prompt(result: ReadResult, params: ReadParams = ReadParams()):
    """The SAM prompt of a ReadResult: its positive and negative points, `multimask` as params."""
    from grounding.sam import SamPrompt

    pts, labels = result.sas.sam_points()
    return SamPrompt(pts, labels, multimask=params.multimask)


def segment_read(
    vlm, segmenter, image, queries: Sequence[str], params: ReadParams = ReadParams()
) -> tuple[list, dict[str, float]]:
    """Text queries -> SasP points -> SAM. Returns `SegmentedObject`s (location: the ReadResult) and timings."""
    from grounding.segment import segmented_object

    t0 = time.perf_counter()
    results = read_batch(vlm, [image] * len(queries), list(queries), params)
    t1 = time.perf_counter()
    prompts = [read_prompt(r, params) for r in results]
    masks = segmenter.segment(image, prompts)
    t2 = time.perf_counter()
    objects = [segmented_object(r.query, p, m, "read", r) for r, p, m in zip(results, prompts, masks)]
    timings = {"read_s": t1 - t0, "sam_s": t2 - t1, **{f"sam_{k}_s": v for k, v in segmenter.timings.items()}}
    return objects, timings


__all__ = [
    "PRESETS",
    "ReadParams",
    "ReadResult",
    "SasPPoints",
    "dtoc",
    "parse_read",
    "read_batch",
    "read_prompt",
    "segment_read",
    "similarity_points",
]
