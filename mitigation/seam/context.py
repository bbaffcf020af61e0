"""The per-request state of the seam, in a ContextVar (never on modules).

`scope(plan, recorder, image_mask=...)` compiles the plan for the batch and makes it current for the
duration of a `with` block; the attention function and the hidden-state hooks read `current()`.
`scope(request=...)` does the same for a prepared `mitigation.seam.request.Request` (methods: its composed
plan, key sets, hooks and second-stream rows). Threads and asyncio tasks each see their own scope.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lucid_kernels.reference import AttentionEdit
from mitigation.seam.hooks import Hook, edit_rows
from mitigation.seam.plan import Plan, compile_edits
from mitigation.seam.recorder import AttentionRecorder

if TYPE_CHECKING:
    from mitigation.seam.request import Request


@dataclass
class Active:
    """What the attention function needs for the current request (one object per request; mutable only
    by `keep_rows`, when a second stream is dropped after prefill).

    Attributes:
        edits: layer -> compiled static edit of the decode steps (every LayerEdit).
        prefill_edits: layer -> compiled static edit of the prefill (the LayerEdits with `first_token`);
            None: the same as `edits`.
        recorder: receives rows / hidden states of the first `n_main` batch rows only.
        image_index: [R, N] positions of the image tokens (-1 = padding).
        hooks: request hooks in composition order.
        n_main: the request's own rows; rows past it are a method's second stream (None: all rows).
    """

    edits: dict[int, AttentionEdit] = field(default_factory=dict)
    recorder: AttentionRecorder | None = None
    image_index: torch.Tensor | None = None
    hooks: tuple[Hook, ...] = ()
    n_main: int | None = None
    prefill_edits: dict[int, AttentionEdit] | None = None
    attention_hooks: dict[int, tuple[Hook, ...]] = field(default_factory=dict, init=False)
    input_hooks: dict[int, tuple[Hook, ...]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for h in self.hooks:
            for layer in h.attention_layers:
                self.attention_hooks[layer] = self.attention_hooks.get(layer, ()) + (h,)
            for layer in h.input_layers:
                self.input_hooks[layer] = self.input_hooks.get(layer, ()) + (h,)

    def edit_for(self, layer: int, prefill: bool) -> AttentionEdit | None:
        """The layer's static edit for a prefill call or a decode step."""
        edits = self.prefill_edits if prefill and self.prefill_edits is not None else self.edits
        return edits.get(layer)

    def touches(self, layer: int) -> bool:
        return (
            layer in self.edits
            or layer in self.attention_hooks
            or (self.recorder is not None and self.recorder.wants_attention(layer))
        )

    def main_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The request's own rows of a per-row tensor (what the recorder keeps)."""
        return t if self.n_main is None else t[: self.n_main]

    def keep_rows(self, n: int) -> None:
        """Drop every batch row past the first n (from edits, the image index and every hook)."""
        self.edits = {layer: edit_rows(e, n) for layer, e in self.edits.items()}
        if self.prefill_edits is not None:
            self.prefill_edits = {layer: edit_rows(e, n) for layer, e in self.prefill_edits.items()}
        if self.image_index is not None:
            self.image_index = self.image_index[:n]
        for h in self.hooks:
            h.keep_rows(n)


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
    request: Request | None = None,
) -> Iterator[Active]:
    """Make `plan` and `recorder` current for the model calls inside the block.

    Args:
        plan: attention edits; None or an empty plan leaves attention untouched.
        recorder: collects image-attention rows / hidden states; None records nothing.
        image_mask: [B, T] bool, the image-token positions of the prompt (from input_ids).
        key_sets: extra named key sets for plans, [B, T] bool each ("image" is image_mask).
        n_heads, n_layers: the text backbone's query heads and layers (needed to compile a plan).
        request: a prepared request (`mitigation.prepare`): its plan (which already contains `plan`),
            key sets, image mask, hooks and second-stream rows replace the arguments above.
    """
    hooks: tuple[Hook, ...] = ()
    n_main = None
    if request is not None:
        plan, image_mask, hooks, n_main = request.plan, request.image_mask, request.hooks, request.n_main
        key_sets = {**request.key_sets, **(key_sets or {})}
    sets = dict(key_sets or {})
    if image_mask is not None:
        sets["image"] = image_mask.bool()
    edits: dict[int, AttentionEdit] = {}
    prefill_edits: dict[int, AttentionEdit] | None = None
    if plan is not None and plan.edits:
        if n_heads is None or n_layers is None:
            raise ValueError("compiling a plan needs n_heads and n_layers of the text backbone")
        edits = compile_edits(plan, sets, n_heads, n_layers)
        if any(not e.first_token for layer_edits in plan.edits.values() for e in layer_edits):
            prefill_edits = compile_edits(plan.at_prefill(), sets, n_heads, n_layers)
    if recorder is not None and image_mask is None:
        raise ValueError("an attention recorder needs image_mask (the image-token positions)")
    index = image_index_from_mask(image_mask.bool()) if image_mask is not None else None
    active = Active(
        edits=edits, recorder=recorder, image_index=index, hooks=hooks, n_main=n_main, prefill_edits=prefill_edits
    )
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)
