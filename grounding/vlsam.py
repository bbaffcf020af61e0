"""VL-SAM: open-ended detection and segmentation from a VLM's attention + SAM (`--method vl-sam`, `--all`).

Lin, Wang, Tang, "Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts",
NeurIPS 2024 (arXiv 2410.05963). No official code exists; everything follows the research notes' §3, taken
from the abstract and third-party summaries (their formulas unchecked against the PDF). The pipeline:

1. The VLM answers `prompt` ("Describe the image."); object names are parsed from its own words
   (`parser`: "shapes" = the testbed's colour + shape vocabulary, the rule of
   `testbed.world.language.mentioned_categories`; "list" = the answer split at commas / "and", articles and
   number words dropped; "auto" = "shapes" when the answer names any, else "list"). Referring mode (a
   query such as "the red circle") teacher-forces `refer_answer` ("The image shows {query}.") as the answer
   instead, and the object is the query's words without the article.
2. One teacher-forced forward over prompt + answer records every layer's full causal attention with the
   project's recorder (`FlowRecorder`, an `AttentionRecorder` whose key set is every position and whose
   rows are every prompt row): each layer's [H, N, N] is folded into the flow as it arrives and dropped,
   so at most one layer's probabilities and two [N, N] matrices are held at a time.
3. Head aggregation (`head_weights="meanmax"`): W_h = mean over queries of the max over keys of S_h;
   S' = mean_h W_h S_h. The causal-collapse correction (`regularize="layer"`): column j of N is multiplied
   by 1 - (L0 - 1) / N, L0 = N - j its unmasked length, i.e. (j + 1) / N (the notes read the formula's L as
   the sequence length: with the layer count it would be negative). Flow (`flow="paper"`, the summary's
   formula): F_l = rownorm((I + S'_l) (I + F_{l-1})), F_0 = 0, rows renormalised each layer (fp32);
   `flow="rollout"` is the standard F_l = rownorm(I + S'_l) F_{l-1}; `flow="none"` the mean of S'_l over
   layers. The object's map: the mean of F_L's rows at the object word's tokens (`row="word"`: the tokens
   as inputs; `"predict"`: the rows that predicted them), on the image-token columns, as the base-view
   grid, min-max normalised, painted bilinearly onto the view's ORIGINAL pixels through `ImageLayout`.
4. Points: the map min-max over the visible pixels, >= `threshold` (0.5: not given by the paper), the
   largest connected region (4-connectivity) is the positive area, the rest the negative one; the
   maximum inside is the positive point, the minimum outside the negative (`negative`).
5. Refinement (`iterations`, 2): iteration 1 feeds the mask's low-res logits back as SAM's `mask_input`
   with the same points; iteration 2 re-samples the points on attention x mask (the negative: the
   attention's minimum outside the mask, where attention x mask is 0 everywhere) and calls SAM with the
   previous mask again. `discover` (the other reading of step 2, an option: off by default) then looks
   for further instances on attention x (1 - the masks found so far): while the remaining peak of the
   min-max map is >= `discover_peak`, points on it (the same rule) and a fresh SAM call add a candidate,
   at most `discover` per map.
6. Multi-scale (`multiscale`): the whole image and its four corner quarters, each its own pipeline (VLM
   and SAM on the crop), masks pasted back; question ensemble (`questions` > 1): the first k of
   `question_list`; NMS (`nms_iou`, on masks, class-agnostic) over every candidate of every iteration's
   final mask, scale and question. An object: label, mask, box (the mask's), score (SAM's), the points of
   its last SAM call, the scale and question it came from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grounding.options import PresetOptions, parse_options

PARSERS = ("auto", "shapes", "list")
HEAD_WEIGHTS = ("meanmax", "uniform")
FLOWS = ("paper", "rollout", "none")
REGULARIZE = ("layer", "final", "none")
ROWS = ("word", "predict")
QUESTION_LISTS = ("auto", "testbed", "generic")
SCALES = ("whole", "top_left", "top_right", "bottom_left", "bottom_right")
#: Lucid's stand-in for the paper's 10 VLM-generated "list the objects" questions (the notes: the VLM
#: writes them; a fixed list keeps the run deterministic); no commas, so they fit a `k=v,...` spec.
GENERIC_QUESTIONS = (
    "Describe the image.",
    "List the objects in the image.",
    "What objects are in this image?",
    "Name every object you can see.",
    "What can you see in the picture?",
    "List everything that appears in the image.",
    "What things are shown in this image?",
    "Describe all the objects in the scene.",
    "Which objects does the image contain?",
    "Tell me what is in the image.",
)
_ARTICLES = ("the", "a", "an")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "some", "several")


@dataclass(frozen=True)
class VlsamParams(PresetOptions):
    """VL-SAM's parameters. No official code exists: `preset="official"` is the paper's stated defaults
    (via the summaries in the research notes), and "paper" names the same values; explicit values override.

    Attributes:
        prompt: the describing question (open-ended, and the question of referring mode).
        refer_answer: referring mode's teacher-forced answer, with "{query}" (Lucid's: the paper has none).
        parser: how object names are read from the answer: auto | shapes | list.
        head_weights: "meanmax" (the paper's W = mean over queries of max over keys) or "uniform".
        flow: "paper" (F_l = rownorm((I + S'_l)(I + F_{l-1}))), "rollout" (rownorm(I + S'_l) F_{l-1}), "none".
        regularize: the column correction (j + 1) / N on each layer's S' ("layer"), on F_L ("final"), "none".
        row: "word" (the object tokens' own rows) or "predict" (the rows that predicted them).
        threshold: min-max map cut-off of the positive area (not given by the paper: 0.5).
        negative: send the negative point.
        multimask: SAM's multimask_output on the first call (the best-scored mask is taken).
        iterations: 0 (points only), 1 (+ the mask fed back), 2 (+ points re-sampled on attention x mask).
        discover: at most this many further instances per map from attention x (1 - masks) (0: off; the
            paper's step 2 read as instance discovery, an ambiguous reading of it: an option).
        discover_peak: discovery stops once the remaining min-max map's peak is below this.
        multiscale: also the four corner quarters of the image (the paper's default: on).
        questions: how many questions of `question_list` (the paper's default: 10; 1 = `prompt` alone).
        question_list: "testbed" (the testbed's 4 caption questions), "generic" (GENERIC_QUESTIONS), or
            "auto" (testbed for the embedded model, else generic); the first question is always `prompt`.
        nms_iou: mask IoU above which a lower-scored candidate is dropped (not given by the paper: 0.5).
        max_new_tokens: the describing answer's budget.
        max_objects: at most this many object names per answer.
    """

    preset: str = "official"
    prompt: str = "Describe the image."
    refer_answer: str = "The image shows {query}."
    parser: str = "auto"
    head_weights: str = "meanmax"
    flow: str = "paper"
    regularize: str = "layer"
    row: str = "word"
    threshold: float = 0.5
    negative: bool = True
    multimask: bool = True
    iterations: int = 2
    discover: int = 0
    discover_peak: float = 0.5
    multiscale: bool = True
    questions: int = 10
    question_list: str = "auto"
    nms_iou: float = 0.5
    max_new_tokens: int = 64
    max_objects: int = 16

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, allowed in (
            ("parser", PARSERS),
            ("head_weights", HEAD_WEIGHTS),
            ("flow", FLOWS),
            ("regularize", REGULARIZE),
            ("row", ROWS),
            ("question_list", QUESTION_LISTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.prompt.strip():
            raise ValueError("prompt must be non-empty")
        if self.refer_answer.count("{query}") != 1:
            raise ValueError(f"refer_answer must contain '{{query}}' exactly once, got {self.refer_answer!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.iterations not in (0, 1, 2):
            raise ValueError(f"iterations must be 0, 1 or 2, got {self.iterations}")
        if self.discover < 0:
            raise ValueError(f"discover must be >= 0, got {self.discover}")
        if not 0 < self.discover_peak <= 1:
            raise ValueError(f"discover_peak must be in (0, 1], got {self.discover_peak}")
        if self.questions < 1:
            raise ValueError(f"questions must be >= 1, got {self.questions}")
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return PRESETS


#: no official code: both presets are the paper's stated defaults (research notes §3.4)
PRESETS: dict[str, dict] = {"official": {}, "paper": {}}


def parse_vlsam(spec: str) -> VlsamParams:
    """'vl-sam' or 'vl-sam:k=v,...' (e.g. 'vl-sam:multiscale=false,iterations=1') -> VlsamParams.

    Raises:
        ValueError: another method name, an unknown option, or a bad value (the message names it).
    """
    return parse_options(spec, "vl-sam", VlsamParams)


# ------------------------------------------------------------------------------------ the attention flow


def head_weights(probs, how: str = "meanmax"):
    """[H, N, N] one layer's attention -> [H] head weights: the mean over queries of the max over keys
    ("meanmax"), or ones ("uniform")."""
    import torch

    if how == "uniform":
        return torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    return probs.amax(-1).mean(-1)


def column_factors(n: int, dtype=None, device=None):
    """[n] the causal-collapse correction: column j (unmasked length L0 = n - j) times 1 - (L0 - 1) / n."""
    import torch

    j = torch.arange(n, dtype=dtype or torch.float32, device=device)
    return 1.0 - ((n - j) - 1.0) / n


def aggregate_heads(probs, how: str = "meanmax"):
    """[H, N, N] -> [N, N]: S' = mean_h W_h S_h."""
    w = head_weights(probs, how)
    return (probs * w[:, None, None]).mean(0)


def _rownorm(a):
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


class AttentionFlow:
    """The regularised attention flow, folded one layer at a time (`add` each layer's [H, N, N] in order).

    Holds the running [N, N] flow F (fp32 by default, or `dtype`) and, for `flow="none"`, the running sum of
    S'. Cost per layer: the [H, N, N] head weighting (O(H N^2)) and one [N, N] x [N, N] product (O(N^3))."""

    def __init__(self, params: VlsamParams = VlsamParams(), dtype=None) -> None:
        self.params = params
        self.dtype = dtype
        self.flow = None
        self.layers = 0

    def add(self, probs) -> None:
        import torch

        p = self.params
        probs = probs.to(self.dtype or torch.float32)
        n = probs.shape[-1]
        s = aggregate_heads(probs, p.head_weights)
        if p.regularize == "layer":
            s = s * column_factors(n, s.dtype, s.device)[None, :]
        eye = torch.eye(n, dtype=s.dtype, device=s.device)
        if p.flow == "none":
            self.flow = s if self.flow is None else self.flow + s
        elif p.flow == "rollout":
            step = _rownorm(eye + s)
            self.flow = step if self.flow is None else step @ self.flow
        else:  # the summary's formula: F_l = (I + S'_l)(I + F_{l-1}), F_0 = 0, rows renormalised
            prev = eye if self.flow is None else eye + self.flow
            self.flow = _rownorm((eye + s) @ prev)
        self.layers += 1

    def result(self):
        """[N, N] the final flow (after the "final" regularisation, if asked)."""
        import torch

        if self.flow is None:
            raise ValueError("no layer was added to the flow")
        f = self.flow / self.layers if self.params.flow == "none" else self.flow
        if self.params.regularize == "final":
            f = f * column_factors(f.shape[-1], f.dtype, f.device)[None, :]
        return f.to(torch.float32)


def flow_recorder(params: VlsamParams = VlsamParams()):
    """A `FlowRecorder` (the class is built on first use: the recorder module imports torch, and this
    module's parameter parsing must not)."""
    global _FLOW_RECORDER
    if _FLOW_RECORDER is None:
        from mitigation import AttentionRecorder

        class FlowRecorder(AttentionRecorder):
            """The project's recorder, folding every layer's full attention into an `AttentionFlow` as it
            arrives. Used in a scope whose key set ("image_mask") is every position of a single row, with
            every prompt row recorded (`prefill_rows="all"`): the seam then hands it each layer's
            [1, H, N, N] probabilities, which are weighted, folded into the flow and dropped (no per-layer
            list is kept)."""

            def __init__(self, params: VlsamParams) -> None:
                super().__init__(layers=None, prefill_rows="all")
                self.flow = AttentionFlow(params)
                self.seen: list[int] = []

            def add_attention(self, layer: int, rows) -> None:
                if rows.shape[0] != 1:
                    raise ValueError("FlowRecorder takes one row at a time")
                if self.seen and layer != self.seen[-1] + 1:
                    raise RuntimeError(f"layers out of order: {layer} after {self.seen[-1]}")
                self.flow.add(rows[0])
                self.seen.append(layer)

        _FLOW_RECORDER = FlowRecorder
    return _FLOW_RECORDER(params)


_FLOW_RECORDER = None


def teacher_forced_flow(vlm, inputs, answer_ids: Sequence[int], params: VlsamParams = VlsamParams()):
    """One forward over a single row's prompt + `answer_ids` with a `FlowRecorder`: the [N, N] flow, N the
    prompt length + len(answer_ids)."""
    import torch

    import mitigation

    if inputs.batch_size != 1:
        raise ValueError("teacher_forced_flow takes one row")
    ids = inputs.input_ids
    extra = torch.tensor([list(answer_ids)], dtype=ids.dtype, device=ids.device)
    ids = torch.cat([ids, extra], 1)
    mask = torch.cat([inputs.attention_mask, torch.ones_like(extra, dtype=inputs.attention_mask.dtype)], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    rec = flow_recorder(params)
    kw = {"image_sizes": inputs.image_sizes} if inputs.image_sizes is not None else {}
    with torch.inference_mode(), mitigation.scope(recorder=rec, image_mask=mask.bool()):
        vlm.model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=inputs.pixel_values,
            position_ids=pos,
            use_cache=False,
            logits_to_keep=1,
            **kw,
        )
    if len(rec.seen) != vlm.n_layers:
        raise RuntimeError(f"the flow saw {len(rec.seen)} of {vlm.n_layers} layers")
    return rec.flow.result()


# ------------------------------------------------------------------------------------ object names


@dataclass(frozen=True)
class ObjectName:
    """One object named in an answer: its label and the character span of its words in the answer."""

    label: str
    span: tuple[int, int]


def parse_shapes(text: str) -> list[ObjectName]:
    """The testbed's vocabulary: a colour word followed by a shape word (plural allowed), as
    `testbed.world.language.mentioned_categories` reads captions; labels "red circle", in order."""
    from testbed.world.scenes import COLORS, SHAPES

    words = [(m.group(0), m.start(), m.end()) for m in re.finditer(r"[A-Za-z]+", text)]
    out = []
    for (a, s0, _), (b, _, e1) in zip(words, words[1:]):
        low = b.lower()
        shape = low[:-1] if low.endswith("s") and low[:-1] in SHAPES else low
        if a.lower() in COLORS and shape in SHAPES:
            out.append(ObjectName(f"{a.lower()} {shape}", (s0, e1)))
    return out


def parse_list(text: str) -> list[ObjectName]:
    """A plain noun-phrase list: the answer split at commas, semicolons, periods and the word "and"; each
    piece without a leading "there is / the image shows"-style clause, articles and number words; pieces
    of 1-4 words are objects."""
    out, cuts = [], [(0, 0)]
    cuts += [(m.start(), m.end()) for m in re.finditer(r"[,;.\n]|\band\b", text)] + [(len(text), len(text))]
    for (_, s), (e, _) in zip(cuts, cuts[1:]):
        chunk = text[s:e]
        lead = re.match(
            r"\s*(?:(?:the image|this image|the picture|it|there)\s+(?:shows|contains|is|are|has)\s+)?", chunk, re.I
        )
        s += lead.end() if lead else 0
        words = [(w.group(0), s + w.start(), s + w.end()) for w in re.finditer(r"[A-Za-z][A-Za-z'-]*", text[s:e])]
        while words and words[0][0].lower() in (*_ARTICLES, *_NUMBERS):
            words = words[1:]
        if 1 <= len(words) <= 4:
            out.append(ObjectName(" ".join(w.lower() for w, *_ in words), (words[0][1], words[-1][2])))
    return out


def parse_objects(text: str, parser: str = "auto", limit: int = 16) -> list[ObjectName]:
    """Object names in `text` (module doc, step 1), duplicates by label kept once (the first)."""
    names = parse_shapes(text) if parser in ("auto", "shapes") else []
    if parser == "list" or (parser == "auto" and not names):
        names = parse_list(text)
    seen, out = set(), []
    for n in names:
        if n.label not in seen:
            seen.add(n.label)
            out.append(n)
    return out[:limit]


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's character span in it (by decoding prefixes)."""
    spans, prev = [], 0
    text = ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)
        spans.append((prev, len(text)))
        prev = len(text)
    return text, spans


def span_tokens(spans: Sequence[tuple[int, int]], span: tuple[int, int]) -> tuple[int, ...]:
    """Indices of the tokens whose characters overlap `span` (whitespace-only overlap does not count)."""
    a, b = span
    return tuple(i for i, (s, e) in enumerate(spans) if e > s and s < b and e > a)


def answer_ids(vlm, question: str, answer: str) -> list[int]:
    """`answer` tokenized as the model would write it after the chat prompt of `question` (the tail of
    the joint tokenization: a leading space becomes part of the first word, as in generation)."""
    from vlm.inputs import chat_prompt

    tok = vlm.processor.tokenizer
    prompt = chat_prompt(vlm, question)
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    both = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    if both[: len(head)] == head and len(both) > len(head):
        return list(both[len(head) :])
    return list(tok(answer, add_special_tokens=False)["input_ids"])


def _without_article(query: str) -> str:
    q = query.strip()
    first, _, rest = q.partition(" ")
    return rest.strip() if first.lower() in _ARTICLES and rest.strip() else q


# ------------------------------------------------------------------------------------ maps per object


@dataclass(frozen=True)
class ObjectMap:
    """One object word's attention map in one view of the image.

    Attributes:
        label: the object's name (open-ended: parsed from the answer; referring: the query).
        question: the question asked.
        scale: "whole" or the corner quarter ("top_left", ...).
        offset: (x, y) of the view's top-left corner in the full image (pixels).
        grid: [rows, cols] the min-max-normalised map on the base-view grid.
        pixels: [h, w] the map painted onto the view's ORIGINAL pixels (NaN where the processor cropped
            or padded), min-max over the visible pixels.
        positions: the input positions whose flow rows were averaged.
        answer: the answer text (generated, or referring's teacher-forced answer).
        layout: the view's ImageLayout.
    """

    label: str
    question: str
    scale: str
    offset: tuple[int, int]
    grid: np.ndarray = field(repr=False, compare=False)
    pixels: np.ndarray = field(repr=False, compare=False)
    positions: tuple[int, ...]
    answer: str
    layout: object = field(repr=False, compare=False, default=None)

    @property
    def values(self) -> np.ndarray:  # the overlay's interface (grounding.Location-like)
        return self.grid

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "question": self.question,
            "scale": self.scale,
            "offset": list(self.offset),
            "positions": list(self.positions),
            "answer": self.answer,
            "map": {"grid": list(self.grid.shape), "values": np.round(self.grid, 6).tolist()},
        }


def _minmax_nan(a: np.ndarray) -> np.ndarray:
    seen = ~np.isnan(a)
    out = np.full_like(a, np.nan, dtype=np.float64)
    if seen.any():
        lo, hi = float(a[seen].min()), float(a[seen].max())
        out[seen] = (a[seen] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def views(image, multiscale: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(scale, (x0, y0, x1, y1)) of the whole image and, with `multiscale`, its four corner quarters."""
    w, h = image.size
    out = [("whole", (0, 0, w, h))]
    if multiscale:
        cx, cy = w // 2, h // 2
        out += [
            ("top_left", (0, 0, cx, cy)),
            ("top_right", (cx, 0, w, cy)),
            ("bottom_left", (0, cy, cx, h)),
            ("bottom_right", (cx, cy, w, h)),
        ]
    return [(s, b) for s, b in out if b[2] - b[0] >= 2 and b[3] - b[1] >= 2]


def question_set(vlm, params: VlsamParams) -> tuple[str, ...]:
    """The questions asked in open-ended mode: `prompt` first, then the list's others, `questions` in all."""
    which = params.question_list
    if which == "auto":
        from vlm.checkpoint import TESTBED

        which = "testbed" if getattr(vlm, "source", None) == TESTBED else "generic"
    if which == "testbed":
        from testbed.world.language import CAPTION_QUESTIONS as pool
    else:
        pool = GENERIC_QUESTIONS
    qs = [params.prompt] + [q for q in pool if q != params.prompt]
    return tuple(qs[: params.questions])


def view_maps(vlm, image, query: str | None, question: str, params: VlsamParams) -> list[ObjectMap]:
    """The object maps of one view (an image): describe (or teacher-force the referring answer), parse,
    one teacher-forced forward with the flow, one map per object."""
    import torch

    from vlm import SamplingParams, build_inputs, generate

    inputs = build_inputs(vlm, [image], [question])
    tok = vlm.processor.tokenizer
    if query is None:
        gen = generate(vlm, inputs, SamplingParams(max_new_tokens=params.max_new_tokens))[0]
        ids = list(gen.token_ids)
        text, spans = token_spans(tok, ids)
        names = parse_objects(text, params.parser, params.max_objects)
    else:
        ids = answer_ids(vlm, question, params.refer_answer.replace("{query}", query))
        text, spans = token_spans(tok, ids)
        target = _without_article(query)
        at = text.lower().rfind(target.lower())
        names = [ObjectName(query, (at, at + len(target)))] if at >= 0 else []
        if not names:
            raise ValueError(f"the referring answer {text!r} does not contain {target!r}")
    if not names or not ids:
        return []
    flow = teacher_forced_flow(vlm, inputs, ids, params)
    T0 = inputs.input_ids.shape[1]
    lay = inputs.layouts[0]
    cols = torch.tensor(lay.token_positions, device=flow.device)
    out = []
    for n in names:
        toks = span_tokens(spans, n.span)
        if not toks:
            continue
        pos = tuple(T0 + i - (1 if params.row == "predict" else 0) for i in toks)
        rows = flow[list(pos)].mean(0)[cols].reshape(lay.grid).cpu().numpy().astype(np.float64)
        lo, hi = rows.min(), rows.max()
        grid = (rows - lo) / (hi - lo) if hi > lo else np.zeros_like(rows)
        pixels = _minmax_nan(lay.to_original_map(grid, "bilinear"))
        out.append(ObjectMap(n.label, question, "whole", (0, 0), grid, pixels, pos, text, lay))
    del flow
    return out


def object_maps(vlm, image, query: str | None = None, params: VlsamParams = VlsamParams()) -> list[ObjectMap]:
    """Every view's (and, open-ended, every question's) object maps of `image` (a PIL image or an array).
    `query` None: open-ended; else referring (one map per view, for the query)."""
    from PIL import Image

    img = image if hasattr(image, "crop") else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    qs = question_set(vlm, params) if query is None else (params.prompt,)
    out = []
    for scale, (x0, y0, x1, y1) in views(img, params.multiscale):
        crop = img if scale == "whole" else img.crop((x0, y0, x1, y1))
        for q in qs:
            for m in view_maps(vlm, crop, None if query is None else query.strip(), q, params):
                out.append(ObjectMap(m.label, q, scale, (x0, y0), m.grid, m.pixels, m.positions, m.answer, m.layout))
    return out


# ------------------------------------------------------------------------------------ points, SAM, NMS


def map_points(pixels: np.ndarray, threshold: float = 0.5, negative: bool = True):
    """The paper's point rule on a [h, w] map (NaN: not part of the image): min-max over the visible
    pixels, >= threshold, the largest connected region (4-connectivity; ties: the lowest label, raster
    order); the positive point is the maximum inside it, the negative the minimum outside it (None when
    nothing visible lies outside, or `negative` is off). Points are (x, y) pixels; also returns the region.
    """
    from scipy.ndimage import label

    norm = _minmax_nan(np.asarray(pixels, dtype=np.float64))
    seen = ~np.isnan(norm)
    if not seen.any():
        raise ValueError("the map has no visible pixel")
    fg = seen & (np.nan_to_num(norm, nan=-1.0) >= threshold)
    if not fg.any():  # a flat map: its maximum is the region
        fg = np.zeros_like(seen)
        fg.flat[int(np.nanargmax(norm))] = True
    lab, n = label(fg)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    region = lab == (int(np.argmax(sizes)) + 1)
    inside = np.where(region, norm, -np.inf)
    py, px = np.unravel_index(int(np.argmax(inside)), norm.shape)
    neg = None
    outside = seen & ~region
    if negative and outside.any():
        vals = np.where(outside, norm, np.inf)
        ny, nx = np.unravel_index(int(np.argmin(vals)), norm.shape)
        neg = (float(nx), float(ny))
    return (float(px), float(py)), neg, region


@dataclass(frozen=True)
class Candidate:
    """One object map's SAM result after the refinement (in full-image pixels)."""

    source: ObjectMap = field(repr=False, compare=False)
    mask: np.ndarray = field(repr=False, compare=False)
    score: float
    points: tuple[tuple[float, float, int], ...]
    stage: int  # the iteration of the mask (0..iterations; iterations + k: the k-th discovered instance)

    @property
    def box(self) -> tuple[float, float, float, float]:
        from grounding.sam import mask_box

        return mask_box(self.mask)


def _prompt(pos, neg, mask_input=None, multimask=None):
    from grounding.sam import SamPrompt

    pts = (pos,) + ((neg,) if neg is not None else ())
    return SamPrompt(pts, (1,) + ((0,) if neg is not None else ()), mask_input=mask_input, multimask=multimask)


def refine(segmenter, image: np.ndarray, maps: Sequence[ObjectMap], params: VlsamParams = VlsamParams()) -> list:
    """Points -> SAM -> refinement (module doc, steps 4-5) for every map, its view's SAM calls batched
    (maps of one view share one image embedding). Returns `Candidate`s (one per map, then the instances
    `discover` found) in full-image pixels."""
    H, W = image.shape[:2]
    out: list = [None] * len(maps)
    by_view: dict[tuple, list[int]] = {}
    for i, m in enumerate(maps):
        by_view.setdefault((m.offset, m.pixels.shape), []).append(i)
    for ((ox, oy), (h, w)), idx in by_view.items():
        crop = image[oy : oy + h, ox : ox + w]
        pts = [map_points(maps[i].pixels, params.threshold, params.negative)[:2] for i in idx]
        res = segmenter.segment(crop, [_prompt(p, n, multimask=params.multimask) for p, n in pts])
        stage = [(r.masks[r.best], r.scores[r.best], r.low_res[r.best]) for r in res]
        used = list(pts)
        if params.iterations >= 1:
            res = segmenter.segment(crop, [_prompt(p, n, s[2], False) for (p, n), s in zip(pts, stage)])
            stage = [(r.masks[0], r.scores[0], r.low_res[0]) for r in res]
        if params.iterations >= 2:
            used = []
            for i, s in zip(idx, stage):
                pix = maps[i].pixels
                gated = np.where(s[0], pix, 0.0)
                gated[np.isnan(pix)] = np.nan
                (p, _, region) = map_points(gated, params.threshold, False)
                neg = None
                if params.negative:  # attention x mask is 0 outside the mask: the attention's minimum there
                    outside = ~np.isnan(pix) & ~s[0] & ~region
                    if outside.any():
                        ny, nx = np.unravel_index(int(np.argmin(np.where(outside, pix, np.inf))), pix.shape)
                        neg = (float(nx), float(ny))
                used.append((p, neg))
            res = segmenter.segment(crop, [_prompt(p, n, s[2], False) for (p, n), s in zip(used, stage)])
            stage = [(r.masks[0], r.scores[0], r.low_res[0]) for r in res]
        for i, (p, n), s in zip(idx, used, stage):
            full = np.zeros((H, W), dtype=bool)
            full[oy : oy + h, ox : ox + w] = s[0]
            points = ((p[0] + ox, p[1] + oy, 1),) + (((n[0] + ox, n[1] + oy, 0),) if n is not None else ())
            out[i] = Candidate(maps[i], full, float(s[1]), points, params.iterations)
        for i, s in zip(idx, stage):
            out += [
                _placed(maps[i], m, score, pts, params.iterations + k + 1, (ox, oy), (H, W))
                for k, (m, score, pts) in enumerate(discover(segmenter, crop, maps[i].pixels, s[0], params))
            ]
    return out


def _placed(source, mask, score, pts, stage, offset, size) -> Candidate:
    """A view's mask and points as a full-image `Candidate`."""
    (ox, oy), (h, w) = offset, mask.shape
    full = np.zeros(size, dtype=bool)
    full[oy : oy + h, ox : ox + w] = mask
    return Candidate(source, full, score, tuple((x + ox, y + oy, lab) for x, y, lab in pts), stage)


def discover(segmenter, crop: np.ndarray, pixels: np.ndarray, found: np.ndarray, params: VlsamParams) -> list:
    """Further instances of one map (`params.discover`): on attention x (1 - everything found so far), while
    the remaining peak of the map's min-max values is >= `discover_peak`, the point rule and a fresh SAM
    call; an empty mask or one adding no new pixel stops it. Returns (mask, score, points) in view pixels."""
    norm = _minmax_nan(np.asarray(pixels, dtype=np.float64))
    seen = ~np.isnan(norm)
    explained = np.asarray(found, dtype=bool).copy()
    out = []
    for _ in range(params.discover):
        rest = seen & ~explained
        if not rest.any() or float(norm[rest].max()) < params.discover_peak:
            break
        residual = np.where(explained, 0.0, norm)
        residual[~seen] = np.nan
        p, n, _ = map_points(residual, params.threshold, params.negative)
        (r,) = segmenter.segment(crop, [_prompt(p, n, multimask=params.multimask)])
        mask = np.asarray(r.masks[r.best], dtype=bool)
        if not (mask & ~explained).any():
            break
        pts = ((p[0], p[1], 1),) + (((n[0], n[1], 0),) if n is not None else ())
        out.append((mask, float(r.scores[r.best]), pts))
        explained |= mask
    return out


def mask_nms(masks: Sequence[np.ndarray], scores: Sequence[float], iou: float = 0.5) -> list[int]:
    """Greedy NMS on masks: indices kept, best score first (ties: the earlier); empty masks are dropped;
    a mask whose IoU with a kept one is > `iou` is dropped."""
    order = sorted(range(len(masks)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    flat = [np.asarray(m, dtype=bool).ravel() for m in masks]
    area = [int(f.sum()) for f in flat]
    for i in order:
        if area[i] == 0:
            continue
        ok = True
        for k in kept:
            inter = int(np.logical_and(flat[i], flat[k]).sum())
            if inter / (area[i] + area[k] - inter) > iou:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


@dataclass(frozen=True)
class VlsamObject:
    """One detected object: label, mask (full image), box (the mask's), score (SAM's), the points of its
    last SAM call, the scale and question it came from."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray = field(repr=False, compare=False)
    points: tuple[tuple[float, float, int], ...]
    scale: str
    question: str
    source: ObjectMap = field(repr=False, compare=False, default=None)

    def segmented(self):
        """As a `grounding.segment.SegmentedObject` (source "vl-sam"; its location, for overlays, is the
        map when it is the whole image's)."""
        from grounding.segment import SegmentedObject

        loc = self.source if self.scale == "whole" else None
        return SegmentedObject(self.label, self.score, self.box, self.mask, self.points, None, "vl-sam", loc)

    def to_json(self) -> dict:
        """`SegmentedObject.to_json()` plus the scale and question it came from."""
        return {**self.segmented().to_json(), "scale": self.scale, "question": self.question}


def merge(candidates: Sequence[Candidate], params: VlsamParams = VlsamParams(), top: int | None = None) -> list:
    """NMS over every candidate -> `VlsamObject`s, best first (`top`: keep the first `top`)."""
    keep = mask_nms([c.mask for c in candidates], [c.score for c in candidates], params.nms_iou)
    if top is not None:
        keep = keep[:top]
    out = []
    for i in keep:
        c = candidates[i]
        out.append(
            VlsamObject(c.source.label, c.score, c.box, c.mask, c.points, c.source.scale, c.source.question, c.source)
        )
    return out


def segment_vlsam(
    vlm, segmenter, image, query: str | None = None, params: VlsamParams = VlsamParams()
) -> tuple[list[VlsamObject], dict[str, float]]:
    """VL-SAM on one image: every object the model names (`query` None) or the query's best candidate
    (referring: the top object after NMS). Returns the objects and timings (seconds)."""
    from grounding.sam import image_array

    arr = image_array(image)
    t0 = time.perf_counter()
    maps = object_maps(vlm, image, query, params)
    t1 = time.perf_counter()
    cands = refine(segmenter, arr, maps, params) if maps else []
    objects = merge(cands, params, top=1 if query is not None else None)
    t2 = time.perf_counter()
    timings = {"vlsam_maps_s": t1 - t0, "sam_s": t2 - t1, **{f"sam_{k}_s": v for k, v in segmenter.timings.items()}}
    return objects, timings


__all__ = [
    "AttentionFlow",
    "Candidate",
    "ObjectMap",
    "PRESETS",
    "VlsamObject",
    "VlsamParams",
    "aggregate_heads",
    "column_factors",
    "discover",
    "flow_recorder",
    "head_weights",
    "map_points",
    "mask_nms",
    "merge",
    "object_maps",
    "parse_objects",
    "parse_vlsam",
    "refine",
    "segment_vlsam",
    "teacher_forced_flow",
]
