"""Answering requests: the one library call the CLI, the service and the studies share.

`answer_batch(vlm, inputs, sampling, ...)` runs one left-padded `generate` with the methods composed in
order, and per row adds what a request may ask for besides the text: where the answer looked (the
localization heads' map or the mean over all heads), the hallucination risk (`lucid.risk`, from the same
recording), and the objects it names located in the image (`grounding.locate_batch`). `ask` is the same
for one image and one question. Drawing (heatmap PNGs) is `lucid.heatmap`'s, on the returned grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lucid.risk import RiskModel, risk_recorder, score_answers
from mitigation import AttentionRecorder, Plan
from mitigation.seam.request import Method
from vlm import VLM, Generation, SamplingParams, VLMInputs, build_inputs, generate
from vlm.contract import check_context
from vlm.inputs import ImageLike

Head = tuple[int, int]


@dataclass(frozen=True)
class Answer:
    """An answer, and what else was asked for.

    Attributes:
        generation: the row's `vlm.Generation` (text, tokens, timings, layout).
        attention_grid: with attention, [rows, cols] shares of image attention (summing to 1) of the rows
            that produced the answer: the mean over layers and heads, or the localization heads' map.
        attention_heads: the (layer, head) pairs the map combines; None for the mean over all heads.
        sampling: the settings used (fit_context may lower max_new_tokens).
        risk: the answer's hallucination risk (mean over its tokens) when a risk model ran, else None.
        token_risk: each token's risk (an answer cut at once by eos has one: its eos row).
        located: the located queries (`grounding.Location`), in the order asked.
        prompt_tokens: the row's prompt length (image tokens included, padding not).
        locate_s: seconds spent locating, per located query (the batch's locate call divided evenly).
    """

    generation: Generation
    attention_grid: np.ndarray | None = None
    attention_heads: tuple[Head, ...] | None = None
    sampling: SamplingParams | None = None
    risk: float | None = None
    token_risk: tuple[float, ...] | None = None
    located: tuple = ()
    prompt_tokens: int = 0
    locate_s: float = 0.0

    @property
    def text(self) -> str:
        return self.generation.text


def answer_attention(
    recorder: AttentionRecorder, n_answer_tokens: int, row: int = 0, layers: list[int] | None = None, start: int = 0
) -> np.ndarray:
    """Mean image attention of the query rows that produced the answer's tokens.

    Recorded row `start` of each layer is the last prompt row (it predicts answer token 0: `start` is 0
    when the recorder keeps only that prompt row, the prompt length - 1 when it keeps them all); decode
    step i predicts token i + 1. Averaged over heads, the chosen layers and those rows. Returns [N].
    """
    layers = layers if layers is not None else recorder.recorded_layers()
    n = max(1, n_answer_tokens)
    stack = [recorder.image_attention(layer)[row, :, start : start + n].float().mean(dim=(0, 1)) for layer in layers]
    return np.stack([s.cpu().numpy() for s in stack]).mean(0)


def head_attention(
    recorder: AttentionRecorder, n_answer_tokens: int, heads: Sequence[Head], row: int = 0, start: int = 0
) -> np.ndarray:
    """The answer rows' image attention of chosen heads: per head averaged over the rows that produced the
    answer and normalised to sum 1, then averaged over heads (the localization heads' combination).
    Returns [N] over all recorded image keys."""
    n = max(1, n_answer_tokens)
    acc = None
    for layer, h in heads:
        m = recorder.image_attention(layer)[row, h, start : start + n].float().mean(0).cpu().numpy().astype(np.float64)
        m = m / m.sum() if m.sum() > 0 else np.full_like(m, 1.0 / m.size)
        acc = m if acc is None else acc + m
    return acc / len(heads)


def _shares(flat: np.ndarray, n: int) -> np.ndarray:
    v = np.clip(np.asarray(flat[:n], dtype=np.float64), 0.0, None)
    return v / v.sum() if v.sum() > 0 else np.full(n, 1.0 / n)


def answer_recorder(
    heads: Sequence[Head] | None, risk: RiskModel | None = None, attention_layers: list[int] | None = None
) -> AttentionRecorder:
    """The recorder an answer's attention map needs (and, with `risk`, the risk score too: one recorder
    feeds both): the chosen heads' layers unreduced, or `attention_layers` (None: all) as head means."""
    rows = "all" if risk is not None and risk.use_prompt else "last"
    layers = attention_layers if heads is None else sorted({layer for layer, _ in heads})
    if risk is not None and layers is not None:
        layers = sorted(set(layers) | set(risk.layers))
    return AttentionRecorder(layers=layers, prefill_rows=rows, reduce_heads="mean" if heads is None else None)


def answer_grid(
    recorder: AttentionRecorder,
    gen: Generation,
    prompt_len: int,
    heads: Sequence[Head] | None,
    row: int = 0,
    attention_layers: list[int] | None = None,
) -> np.ndarray:
    """Batch row `row`'s answer map from `answer_recorder`'s recording: [rows, cols] shares summing to 1.
    `prompt_len`: the batch's padded prompt length."""
    start = prompt_len - 1 if recorder.prefill_rows == "all" else 0
    n = len(gen.token_ids)
    if heads is None:
        flat = answer_attention(recorder, n, row, attention_layers, start)
    else:
        flat = head_attention(recorder, n, heads, row, start)
    return _shares(flat, gen.layout.n_tokens).reshape(gen.layout.grid)


def resolve_heads(vlm: VLM, attention_heads: str | Sequence[Head]) -> tuple[Head, ...] | None:
    """The heads an attention map combines: None for "all" (the mean over layers and heads); for "auto" the
    cached or discovered localization heads (`grounding.load_or_discover`); for "L:H,L:H" or [(l, h), ...]
    those heads (checked against the model).

    Raises:
        ValueError: an unknown keyword, a malformed list, or a head outside the model.
    """
    from grounding.heads import explicit_selection, load_or_discover, parse_heads

    if isinstance(attention_heads, str):
        if attention_heads == "all":
            return None
        if attention_heads == "auto":
            return load_or_discover(vlm).heads
        if ":" not in attention_heads:
            raise ValueError(f"attention_heads must be 'auto', 'all' or 'L:H,...', got {attention_heads!r}")
        attention_heads = parse_heads(attention_heads)
    return explicit_selection(vlm, attention_heads).heads


def default_queries(vlm: VLM, question: str, answer: str) -> tuple[str, ...]:
    """What to locate when a request names nothing: on the embedded model, the testbed objects the answer
    (else the question) names; on any other checkpoint, the question itself."""
    from vlm.checkpoint import TESTBED_DIR

    if Path(vlm.path).resolve() == TESTBED_DIR:
        from testbed.world.language import mentioned_categories

        for text in (answer, question):
            found = sorted(mentioned_categories(text))
            if found:
                return tuple(f"the {c} {s}" for c, s in found)
        return ()
    return (question,)


def answer_batch(
    vlm: VLM,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    sampling: SamplingParams = SamplingParams(),
    *,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    inputs: VLMInputs | None = None,
    methods: Sequence[Method] = (),
    plan: Plan | None = None,
    attention: bool = False,
    attention_heads: str | Sequence[Head] = "all",
    attention_layers: list[int] | None = None,
    risk: RiskModel | None = None,
    locate: Sequence[Sequence[str] | None] | None = None,
    selection=None,
    on_token: Callable[[int, list[int]], None] | None = None,
    stop: Callable[[], Sequence[bool]] | None = None,
) -> list[Answer]:
    """Answer each (image, question) in one left-padded generate call (the methods composed in order,
    after `plan`).

    Args:
        system, history: the conversation's system message and earlier (role, text) turns (the image goes
            in the first user turn), shared by every row (`vlm.build_inputs`).
        inputs: these rows' `build_inputs` already made (reused, not rebuilt).
        attention: also return each answer's image-attention map (`Answer.attention_grid`).
        attention_heads: "all" the mean over layers and heads (`attention_layers`: which layers, None all);
            "auto" the checkpoint's localization heads; or explicit (layer, head) pairs / "L:H,L:H".
        risk: a fitted risk model: each answer then carries `risk` / `token_risk` (one recording feeds the
            map and the risk).
        locate: per row, the phrases to locate after answering (None for a row: `default_queries`); None
            locates nothing. `selection`: the localization heads to use (default: the checkpoint's).
        on_token: called after each step with (step, the token chosen for each row) (streaming).
        stop: asked after each step which rows to end now (`vlm.generate`: finish_reason "cancelled").

    Returns one `Answer` per row; a row answers exactly as it would alone (left padding, greedy or seeded).
    """
    if inputs is None:
        inputs = build_inputs(vlm, list(images), list(questions), system, history)
    heads = resolve_heads(vlm, attention_heads) if attention else None
    recorder = answer_recorder(heads, risk, attention_layers) if attention else None
    if risk is not None:
        recorder = risk_recorder(risk, recorder)
    gens = generate(vlm, inputs, sampling, plan=plan, recorder=recorder, methods=methods, on_token=on_token, stop=stop)
    token_risk = score_answers(risk, recorder, inputs, gens) if risk is not None else [None] * len(gens)
    located: list[tuple] = [()] * len(gens)
    locate_s = 0.0
    if locate is not None:
        t = time.perf_counter()
        located = _locate_rows(vlm, images, questions, gens, locate, selection)
        locate_s = (time.perf_counter() - t) / max(1, sum(len(r) for r in located))
    prompt_tokens = inputs.attention_mask.sum(-1).tolist()
    out = []
    for b, gen in enumerate(gens):
        grid = answer_grid(recorder, gen, inputs.input_ids.shape[1], heads, b, attention_layers) if attention else None
        tr = token_risk[b]
        out.append(
            Answer(
                gen,
                grid,
                heads,
                sampling,
                risk=float(sum(tr) / len(tr)) if tr else None,
                token_risk=tr,
                located=located[b],
                prompt_tokens=int(prompt_tokens[b]),
                locate_s=locate_s,
            )
        )
    return out


def _locate_rows(vlm: VLM, images, questions, gens: list[Generation], locate, selection) -> list[tuple]:
    from grounding.heads import load_or_discover
    from grounding.location import LocateParams, locate_batch

    if selection is None:
        selection = load_or_discover(vlm)
    pairs = []
    for b, (gen, queries) in enumerate(zip(gens, locate)):
        if queries is None:
            queries = default_queries(vlm, questions[b], gen.text)
        pairs += [(b, q) for q in queries]
    if not pairs:
        return [()] * len(gens)
    locs = locate_batch(vlm, [images[b] for b, _ in pairs], [q for _, q in pairs], selection, LocateParams())
    rows: list[list] = [[] for _ in gens]
    for (b, _), loc in zip(pairs, locs):
        rows[b].append(loc)
    return [tuple(r) for r in rows]


def ask(
    vlm: VLM,
    image: ImageLike,
    question: str,
    sampling: SamplingParams = SamplingParams(),
    plan: Plan | None = None,
    attention: bool = False,
    attention_layers: list[int] | None = None,
    attention_heads: str | Sequence[Head] = "all",
    fit_context: bool = False,
    methods: Sequence[Method] = (),
    risk: RiskModel | None = None,
) -> Answer:
    """Answer `question` about `image` (`answer_batch` for one row).

    Args:
        fit_context: when the prompt + max_new_tokens exceed the model's positions, lower max_new_tokens to
            what fits instead of raising ContextLengthError (a prompt that leaves no room still raises).
        methods: registered mitigation methods, composed in order (`mitigation.methods.parse_methods`).
        risk: a fitted risk model (`lucid.risk`); the answer then carries `risk` / `token_risk`.
        attention, attention_heads, attention_layers: as `answer_batch`.
    """
    inputs = build_inputs(vlm, [image], [question])
    prompt_tokens = int(inputs.attention_mask.sum(-1).max())
    fitted = check_context(prompt_tokens, sampling.max_new_tokens, vlm.max_positions, fit=fit_context)
    if fitted != sampling.max_new_tokens:
        sampling = replace(sampling, max_new_tokens=fitted)
    return answer_batch(
        vlm,
        [image],
        [question],
        sampling,
        inputs=inputs,
        methods=methods,
        plan=plan,
        attention=attention,
        attention_heads=attention_heads,
        attention_layers=attention_layers,
        risk=risk,
    )[0]
