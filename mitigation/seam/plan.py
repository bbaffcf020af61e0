"""Plans: the static part of what to change in the text backbone's attention for one request.

A `Plan` maps decoder-layer indices to `LayerEdit`s, model-agnostic descriptions (which key set,
which query rows, per-head coefficients). `compile_edits` turns them into device tensors for one
batch once, at scope entry, so the attention hot path does no Python work per head.

Plans compose: `a.then(b)` keeps, per layer, a's edits followed by b's. The order is the order of
application: logit edits apply in sequence, each to the logits the previous one left
(`z -> f_b(f_a(z))`); head scales multiply (order-free). Methods whose state is only known at
prefill (VAR's sinks, VHR's heads) add their edits through request hooks (`mitigation.seam.request`),
after every static edit of the layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from lucid_kernels.reference import AttentionEdit, KeyEdit

PerHead = float | tuple[float, ...]


@dataclass(frozen=True)
class LayerEdit:
    """One layer's edit. Scalars apply to every head; tuples give one value per query head.

    Attributes:
        key_set: name of the key set the logit edit acts on ("image": the image tokens).
        rows: "all" query rows or only the "last" (every decode step).
        abs_scale: z += abs_scale * |z| on the key set (PAI-style amplification), or None.
        bias: z += bias on the key set, or None.
        head_scale: multiply each head's output (before o_proj), or None.
        first_token: also edit the prefill, whose last row predicts the first answer token; False edits the
            decode steps only (the official PAI / PAINT with guidance on never edit the first answer token).
    """

    key_set: str = "image"
    rows: str = "all"
    abs_scale: PerHead | None = None
    bias: PerHead | None = None
    head_scale: PerHead | None = None
    first_token: bool = True

    def __post_init__(self) -> None:
        if self.rows not in ("all", "last"):
            raise ValueError(f"LayerEdit.rows must be 'all' or 'last', got {self.rows!r}")


@dataclass(frozen=True)
class Plan:
    """Per-layer attention edits for one request. An empty plan changes nothing.

    `edits` maps a layer to a `LayerEdit` or a sequence of them (applied in order); it is stored as
    layer -> tuple of LayerEdits.
    """

    edits: Mapping[int, LayerEdit | Sequence[LayerEdit]] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        norm: dict[int, tuple[LayerEdit, ...]] = {}
        for layer, e in self.edits.items():
            if not isinstance(layer, int) or layer < 0:
                raise ValueError(f"Plan layer indices must be non-negative ints, got {layer!r}")
            seq = (e,) if isinstance(e, LayerEdit) else tuple(e)
            if not all(isinstance(x, LayerEdit) for x in seq):
                raise TypeError(f"Plan layer {layer}: edits must be LayerEdits, got {seq!r}")
            if seq:
                norm[layer] = seq
        object.__setattr__(self, "edits", MappingProxyType(norm))

    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.edits))

    def at_prefill(self) -> Plan:
        """The edits that act on the prefill (those with `first_token`)."""
        kept = {layer: tuple(e for e in edits if e.first_token) for layer, edits in self.edits.items()}
        return Plan(kept, name=self.name)

    def then(self, other: Plan) -> Plan:
        """This plan's edits, then `other`'s, layer by layer (see the module docstring for the order)."""
        merged = {layer: tuple(edits) for layer, edits in self.edits.items()}
        for layer, edits in other.edits.items():
            merged[layer] = merged.get(layer, ()) + tuple(edits)
        name = "+".join(n for n in (self.name, other.name) if n)
        return Plan(merged, name=name)

    @staticmethod
    def compose(plans: Sequence[Plan]) -> Plan:
        out = Plan()
        for p in plans:
            out = out.then(p)
        return out


def _per_head(value: PerHead | None, n_heads: int, device: torch.device, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        return t.expand(n_heads).contiguous()
    if t.numel() != n_heads:
        raise ValueError(f"{what} has {t.numel()} values but the layer has {n_heads} query heads")
    return t


def compile_edits(
    plan: Plan, key_sets: Mapping[str, torch.Tensor], n_heads: int, n_layers: int
) -> dict[int, AttentionEdit]:
    """Lower a plan to per-layer `AttentionEdit`s for one batch.

    Every edit given is applied, even a zero one (it then runs the edited-attention path with no
    effect); methods at zero strength emit no edit at all, which keeps the layer on sdpa.

    Args:
        key_sets: name -> [B, T] bool masks over the prompt tokens (e.g. "image").
        n_heads, n_layers: of the text backbone, for validation.
    """
    out: dict[int, AttentionEdit] = {}
    for layer, edits in plan.edits.items():
        if layer >= n_layers:
            raise ValueError(
                f"plan edits layer {layer} but the text backbone has {n_layers} layers (0..{n_layers - 1})"
            )
        keys: list[KeyEdit] = []
        head_scale: torch.Tensor | None = None
        for e in edits:
            if e.key_set not in key_sets:
                raise ValueError(f"unknown key set {e.key_set!r}; this request has: {', '.join(sorted(key_sets))}")
            mask = key_sets[e.key_set]
            a = _per_head(e.abs_scale, n_heads, mask.device, f"layer {layer} abs_scale")
            b = _per_head(e.bias, n_heads, mask.device, f"layer {layer} bias")
            h = _per_head(e.head_scale, n_heads, mask.device, f"layer {layer} head_scale")
            if a is not None or b is not None:
                keys.append(KeyEdit(key_mask=mask, rows=e.rows, abs_scale=a, bias=b))
            if h is not None:
                head_scale = h if head_scale is None else head_scale * h
        out[layer] = AttentionEdit(head_scale=head_scale, keys=tuple(keys))
    return out
