"""The per-request state of the seam, in a ContextVar (never on modules).

`scope(plan, recorder, image_mask=...)` compiles the plan for the batch and makes it current for the
duration of a `with` block; the attention function and the hidden-state hooks read `current()`.
Threads and asyncio tasks each see their own scope.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from kernels.reference import AttentionEdit
from mitigation.plan import Plan, compile_edits
from mitigation.recorder import AttentionRecorder


@dataclass(frozen=True)
class Active:
    """What the attention function needs for the current request."""

    edits: Mapping[int, AttentionEdit] = field(default_factory=dict)
    recorder: AttentionRecorder | None = None
    image_index: torch.Tensor | None = None  # [B, N] positions of the image tokens (-1 = padding)

    def touches(self, layer: int) -> bool:
        return layer in self.edits or (self.recorder is not None and self.recorder.wants_attention(layer))


_ACTIVE: ContextVar[Active | None] = ContextVar("lucid_active", default=None)


def current() -> Active | None:
    return _ACTIVE.get()


def image_index_from_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, N] long positions (N = most image tokens in a row; shorter rows padded with -1)."""
    counts = image_mask.sum(1)
    n = int(counts.max()) if image_mask.numel() else 0
    idx = torch.full((image_mask.shape[0], n), -1, dtype=torch.long, device=image_mask.device)
    for b in range(image_mask.shape[0]):
        pos = torch.nonzero(image_mask[b]).flatten()
        idx[b, : pos.numel()] = pos
    return idx


@contextmanager
def scope(
    plan: Plan | None = None,
    recorder: AttentionRecorder | None = None,
    *,
    image_mask: torch.Tensor | None = None,
    key_sets: Mapping[str, torch.Tensor] | None = None,
    n_heads: int | None = None,
    n_layers: int | None = None,
) -> Iterator[Active]:
    """Make `plan` and `recorder` current for the model calls inside the block.

    Args:
        plan: attention edits; None or an empty plan leaves attention untouched.
        recorder: collects image-attention rows / hidden states; None records nothing.
        image_mask: [B, T] bool, the image-token positions of the prompt (from input_ids).
        key_sets: extra named key sets for plans, [B, T] bool each ("image" is image_mask).
        n_heads, n_layers: the text backbone's query heads and layers (needed to compile a plan).
    """
    sets = dict(key_sets or {})
    if image_mask is not None:
        sets["image"] = image_mask.bool()
    edits: dict[int, AttentionEdit] = {}
    if plan is not None and plan.edits:
        if n_heads is None or n_layers is None:
            raise ValueError("compiling a plan needs n_heads and n_layers of the text backbone")
        edits = compile_edits(plan, sets, n_heads, n_layers)
    if recorder is not None and image_mask is None:
        raise ValueError("an attention recorder needs image_mask (the image-token positions)")
    index = image_index_from_mask(image_mask.bool()) if image_mask is not None else None
    active = Active(edits=edits, recorder=recorder, image_index=index)
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)
