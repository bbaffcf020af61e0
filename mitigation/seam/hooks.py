"""Request hooks: the per-request, per-layer state of methods that is only known during the forward.

A hook is created for one request (one `generate` call) and lives in that request's scope, never on a
module, so nothing leaks from one sample to the next. The seam calls it, within the scope:

* `layer_input(layer, hidden)`: the hidden state entering a decoder layer ([R, T, D]; prefill and
  every decode step), e.g. VAR's sink detection at prefill;
* `attention_mask(layer, mask, key)`: the layer's attention mask ([R, 1, Tq, Tk] bool or None), before
  anything else reads it; e.g. DyVTE's exit: past the exit layer a decode step's keys lack the image
  positions, so the model's one mask (for the full length) is cut to the layer's own keys;
* `edit(call, edit)`: just before a layer's attention; returns the layer's edit, extended (VAR's
  redistribution, a per-row head scale, per-row logit coefficients measured at prefill);
* `output(call, out)`: the attention output [R, Tq, H, D] before o_proj, e.g. VHR's head selection
  and scaling at prefill (it needs both streams' head outputs of that very layer);
* `keep_rows(n)`: the batch shrank to its first n rows (prefill-only streams were dropped).

R is the number of rows the model runs: the request's rows, then one block of n_main rows per second
stream (`mitigation.seam.request`), a block's row b pairing with request row b; a method finds its own
block at `RequestContext.stream_start`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lucid_kernels.reference import AttentionEdit


@dataclass(frozen=True)
class AttentionCall:
    """One attention call as hooks see it (tensors are the attention function's own)."""

    layer: int
    query: torch.Tensor  # [R, H, Tq, D]
    key: torch.Tensor  # [R, Hkv, Tk, D]
    mask: torch.Tensor | None
    scale: float
    image_index: torch.Tensor | None  # [R, N] positions of the image tokens (-1 = padding)

    @property
    def prefill(self) -> bool:
        return self.query.shape[2] > 1


class Hook:
    """Base class of request hooks: every callback is a no-op; subclasses override what they need.

    Attributes:
        attention_layers: layers whose attention calls `edit` / `output` see.
        input_layers: layers whose input hidden state `layer_input` sees.
    """

    attention_layers: frozenset[int] = frozenset()
    input_layers: frozenset[int] = frozenset()

    def layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        return None

    def attention_mask(self, layer: int, mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
        return mask

    def edit(self, call: AttentionCall, edit: AttentionEdit | None) -> AttentionEdit | None:
        return edit

    def output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def keep_rows(self, n: int) -> None:
        return None


def edit_rows(edit: AttentionEdit | None, n: int) -> AttentionEdit | None:
    """The edit restricted to the first n batch rows (masks are [R, T]; coefficients [H] stay, [R, H] are cut)."""
    if edit is None:
        return None

    def coef(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[:n] if t is not None and t.dim() == 2 else t

    keys = tuple(replace(k, key_mask=k.key_mask[:n], abs_scale=coef(k.abs_scale), bias=coef(k.bias)) for k in edit.keys)
    r = edit.redistribute
    if r is not None:
        r = replace(
            r,
            source=r.source[:n],
            target=r.target[:n],
            gate_keys=r.gate_keys[:n],
            fraction=coef(r.fraction),
            row_start=r.row_start[:n] if r.row_start is not None else None,
        )
    return replace(
        edit,
        key_mask=edit.key_mask[:n] if edit.key_mask is not None else None,
        abs_scale=coef(edit.abs_scale),
        bias=coef(edit.bias),
        head_scale=coef(edit.head_scale),
        keys=keys,
        redistribute=r,
    )


class StopForward(Exception):  # noqa: N818 (a control signal, not an error)
    """Raised inside a forward to end it early: a capture pass that reads only the first layers stops
    computing after the last one it reads (`StopAfter`). The caller that asked for it catches it; the
    scope is left as on any exception, and the half-filled KV cache is dropped with the call."""


class StopAfter(Hook):
    """Ends a prefill after decoder layer `layer` (at the input of the next one) by raising `StopForward`.
    Decode steps are not stopped (their tokens come from the last layer)."""

    def __init__(self, layer: int) -> None:
        self.layer = int(layer)
        self.input_layers = frozenset({self.layer + 1})

    def layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        if hidden.shape[1] > 1:
            raise StopForward(f"stopped after layer {self.layer}")
