"""Per-head text-to-image attention of a referring phrase: one prefill per batch, read by the recorder.

A query ("the red circle") is put into a prompt template ("Where is {query}?"), the checkpoint's chat
template wraps it, and one prefill records, for every chosen layer and head, the post-softmax attention of
two kinds of text rows over the image tokens: the last prompt row (the row that predicts the answer's
first token, the paper's choice) and the phrase's own rows (averaged). The phrase's token positions come
from the tokenizer's character offsets, aligned to the padded batch from the right.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mitigation import AttentionRecorder
from vlm import VLM, ImageLayout, SamplingParams, build_inputs, generate
from vlm.inputs import ImageLike, chat_prompt

ROWS = ("last", "query")
_ARTICLES = ("the ", "a ", "an ")


def render_prompt(template: str, query: str) -> tuple[str, tuple[int, int]]:
    """Put `query` into `template`; returns the question and the phrase's character span in it.

    Placeholders (exactly one): "{query}" the phrase as given ("the red circle"); "{noun}" the phrase
    without a leading article ("red circle"), for templates such as "Is there a {noun} in the image?".

    Raises:
        ValueError: the template has no placeholder or more than one, or the query is empty.
    """
    query = query.strip()
    if not query:
        raise ValueError("the query must be non-empty")
    slots = [s for s in ("{query}", "{noun}") if s in template]
    if len(slots) != 1 or template.count(slots[0]) != 1:
        raise ValueError(f"prompt template {template!r} must contain exactly one of '{{query}}' or '{{noun}}'")
    slot = slots[0]
    phrase = query
    if slot == "{noun}":
        low = query.lower()
        for art in _ARTICLES:
            if low.startswith(art) and len(query) > len(art):
                phrase = query[len(art) :].lstrip()
                break
    start = template.index(slot)
    question = template[:start] + phrase + template[start + len(slot) :]
    return question, (start, start + len(phrase))


def phrase_positions(vlm: VLM, input_ids: torch.Tensor, question: str, span: tuple[int, int]) -> tuple[int, ...]:
    """Positions in one (left-padded, image-expanded) input_ids row of the tokens that overlap the
    phrase's characters `span` of `question`.

    The prompt is tokenized alone with offsets; everything after the image placeholder is tokenized
    identically inside the batch (the image token is special), so positions align from the right.

    Raises:
        RuntimeError: the tail of the row does not match the standalone tokenization.
    """
    prompt = chat_prompt(vlm, question)
    base = prompt.rfind(question)
    if base < 0:
        raise RuntimeError(f"the chat template does not contain the question verbatim: {prompt!r}")
    a, b = base + span[0], base + span[1]
    enc = vlm.processor.tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    if not hits:
        raise RuntimeError(f"no token overlaps the phrase {question[span[0] : span[1]]!r} in {prompt!r}")
    n = len(ids)
    tail = n - hits[0]
    row = input_ids.tolist()
    if tail > len(row) or row[len(row) - tail :] != list(ids[n - tail :]):
        raise RuntimeError(f"cannot align the phrase tokens of {question!r} with the batch row (tokenizer mismatch)")
    return tuple(len(row) - (n - i) for i in hits)


@dataclass(frozen=True)
class QueryAttention:
    """One (image, query) pair's per-head image attention.

    Attributes:
        layout: the row's ImageLayout (grid, geometry); maps cover its `n_tokens` image tokens.
        layers: the recorded decoder layers, in order (index 0 of the arrays below).
        last: [L', H, N] attention of the last prompt row over the N image tokens.
        query: [L', H, N] attention of the phrase's rows over the image tokens, averaged over those rows.
        image_sum: {"last": [L', H], "query": [L', H]}: attention mass on all image keys (S_img).
        positions: the phrase's token positions in the padded row.
    """

    layout: ImageLayout
    layers: tuple[int, ...]
    last: np.ndarray = field(repr=False)
    query: np.ndarray = field(repr=False)
    image_sum: dict[str, np.ndarray] = field(repr=False)
    positions: tuple[int, ...]

    def maps(self, rows: str) -> np.ndarray:
        """[L', H, N] maps of the "last" or "query" rows."""
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        return self.last if rows == "last" else self.query

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not recorded; recorded: {list(self.layers)}") from None


def read_batch(
    vlm: VLM,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int] | None = None,
) -> list[QueryAttention]:
    """One prefill over a batch; per row, the last-row and phrase-row image attention of every head."""
    inputs = build_inputs(vlm, list(images), list(questions))
    T = inputs.input_ids.shape[1]
    per_row = [phrase_positions(vlm, inputs.input_ids[b], questions[b], spans[b]) for b in range(len(questions))]
    union = sorted({p for pos in per_row for p in pos} | {T - 1})
    rec = AttentionRecorder(layers=layers, prefill_rows=tuple(union), reduce_heads=None)
    generate(vlm, inputs, SamplingParams(max_new_tokens=1), recorder=rec)
    rec_layers = tuple(rec.recorded_layers())
    # [B, L', H, S, N_all]: S = the union rows in ascending position order (one prefill, no decode step)
    att = torch.stack([rec.image_attention(layer) for layer in rec_layers], dim=1).float().cpu().numpy()
    col = {p: i for i, p in enumerate(union)}
    out = []
    for b, pos in enumerate(per_row):
        n = inputs.layouts[b].n_tokens
        row = att[b]  # [L', H, S, N_all]
        last_rows = row[:, :, col[T - 1]]  # [L', H, N_all]
        query_rows = row[:, :, [col[p] for p in pos]].mean(axis=2)  # [L', H, N_all]
        out.append(
            QueryAttention(
                layout=inputs.layouts[b],
                layers=rec_layers,
                last=np.ascontiguousarray(last_rows[..., :n], dtype=np.float32),
                query=np.ascontiguousarray(query_rows[..., :n], dtype=np.float32),
                image_sum={"last": last_rows.sum(-1), "query": query_rows.sum(-1)},
                positions=pos,
            )
        )
    return out


def iter_attention(
    vlm: VLM,
    images: Sequence[ImageLike],
    queries: Sequence[str],
    template: str,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Iterator[QueryAttention]:
    """`QueryAttention` for each (image, query) pair in order, `batch_size` pairs per prefill."""
    if len(images) != len(queries):
        raise ValueError(f"{len(images)} images but {len(queries)} queries")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(images), batch_size):
        rendered = [render_prompt(template, q) for q in queries[i : i + batch_size]]
        yield from read_batch(
            vlm, images[i : i + batch_size], [q for q, _ in rendered], [s for _, s in rendered], layers
        )
