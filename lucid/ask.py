"""`ask`: one image, one question, an answer and (optionally) where the answer looked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mitigation import AttentionRecorder, Plan
from vlm import VLM, Generation, SamplingParams, build_inputs, generate
from vlm.inputs import ImageLike


@dataclass(frozen=True)
class Answer:
    generation: Generation
    attention_grid: np.ndarray | None  # [rows, cols] mean image attention of the answer's rows


def answer_attention(
    recorder: AttentionRecorder, n_answer_tokens: int, row: int = 0, layers: list[int] | None = None
) -> np.ndarray:
    """Mean image attention of the query rows that produced the answer's tokens.

    Row 0 of each recorded layer is the last prompt row (it predicts answer token 0); decode step i
    predicts token i + 1. Averaged over heads, the chosen layers and those rows. Returns [N].
    """
    layers = layers if layers is not None else recorder.recorded_layers()
    n = max(1, n_answer_tokens)
    stack = [recorder.image_attention(layer)[row, :, :n].float().mean(dim=(0, 1)) for layer in layers]
    return np.stack([s.cpu().numpy() for s in stack]).mean(0)


def ask(
    vlm: VLM,
    image: ImageLike,
    question: str,
    sampling: SamplingParams = SamplingParams(),
    plan: Plan | None = None,
    attention: bool = False,
    attention_layers: list[int] | None = None,
) -> Answer:
    """Answer `question` about `image`; with `attention`, also return the answer's image-attention grid."""
    inputs = build_inputs(vlm, [image], [question])
    recorder = (
        AttentionRecorder(layers=attention_layers, prefill_rows="last", reduce_heads="mean") if attention else None
    )
    gen = generate(vlm, inputs, sampling, plan=plan, recorder=recorder)[0]
    grid = None
    if recorder is not None:
        flat = answer_attention(recorder, len(gen.token_ids), 0, attention_layers)
        layout = gen.layout
        grid = flat[: layout.n_tokens].reshape(layout.grid)
    return Answer(gen, grid)
