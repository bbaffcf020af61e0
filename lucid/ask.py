"""`ask`: one image, one question, an answer and (optionally) where the answer looked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from mitigation import AttentionRecorder, Plan
from mitigation.methods import Method
from mitigation.risk import RiskModel
from vlm import VLM, Generation, SamplingParams, build_inputs, generate
from vlm.contract import check_context
from vlm.inputs import ImageLike

Head = tuple[int, int]


@dataclass(frozen=True)
class Answer:
    """An answer, and with `attention` the map of where it looked.

    Attributes:
        attention_grid: [rows, cols] shares of image attention (summing to 1) of the rows that produced the
            answer: the mean over layers and heads ("all"), or the localization heads' map.
        attention_heads: the (layer, head) pairs the map combines; None for the mean over all heads.
    """

    generation: Generation
    attention_grid: np.ndarray | None
    attention_heads: tuple[Head, ...] | None = None
    sampling: SamplingParams | None = None  # the settings used (fit_context may lower max_new_tokens)


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
    """Answer `question` about `image`; with `attention`, also return the answer's image-attention map.

    Args:
        attention_layers: with attention_heads="all", the layers averaged (None: all).
        attention_heads: "all" the mean over layers and heads; "auto" the model's localization heads
            (cached per weights hash, discovered on the testbed calibration set on first use); or explicit
            (layer, head) pairs / "L:H,L:H".
        fit_context: when the prompt + max_new_tokens exceed the model's positions, lower max_new_tokens to
            what fits instead of raising ContextLengthError (a prompt that leaves no room still raises).
        methods: registered mitigation methods, composed in order (`mitigation.methods.parse_methods`).
        risk: a fitted risk model (`mitigation.risk`); the generation then carries `risk` / `token_risk`.
    """
    heads = resolve_heads(vlm, attention_heads) if attention else None
    inputs = build_inputs(vlm, [image], [question])
    prompt_tokens = int(inputs.attention_mask.sum(-1).max())
    fitted = check_context(prompt_tokens, sampling.max_new_tokens, vlm.max_positions, fit=fit_context)
    if fitted != sampling.max_new_tokens:
        sampling = replace(sampling, max_new_tokens=fitted)
    recorder = answer_recorder(heads, risk, attention_layers) if attention else None
    gen = generate(vlm, inputs, sampling, plan=plan, recorder=recorder, methods=methods, risk=risk)[0]
    grid = None
    if recorder is not None:
        grid = answer_grid(recorder, gen, inputs.input_ids.shape[1], heads, 0, attention_layers)
    return Answer(gen, grid, heads, sampling)
