"""The attention recorder: image-attention rows and hidden states of chosen layers, per request.

A recorder is a per-request object (never stored on a module) handed to `mitigation.scope`. The
attention function feeds it, for each chosen layer and each forward call (the prefill, then every
decode step), the post-softmax probabilities of chosen query rows on the image keys; only those rows
are computed, so unrecorded layers keep the fast sdpa path and no full attention matrix is built.
The hidden-state capture stores the residual stream entering chosen decoder layers (index L: the
final normed output), in the convention of transformers' `hidden_states` tuple.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AttentionRecorder:
    """Collects image-attention rows and hidden states during one generation.

    Args:
        layers: decoder layers whose image-attention rows are recorded (None: all layers).
        prefill_rows: "last" records only the last prompt row at prefill (the row that predicts the
            first answer token); "all" every prompt row; a tuple of ints those prompt positions (e.g.
            the question's words). Decode steps always record their row.
        reduce_heads: None keeps every head; "mean" averages heads before storing (less memory).
        hidden_layers: indices of hidden states to capture (l = entering layer l; L = final output).
        hidden_rows: "all" prompt rows or only the "last" at prefill (decode steps: their row).
    """

    def __init__(
        self,
        layers: Iterable[int] | None = None,
        prefill_rows: str | tuple[int, ...] = "last",
        reduce_heads: str | None = None,
        hidden_layers: Iterable[int] = (),
        hidden_rows: str = "all",
    ) -> None:
        if isinstance(prefill_rows, str) and prefill_rows not in ("all", "last"):
            raise ValueError(f"prefill_rows must be 'all', 'last' or a tuple of positions, got {prefill_rows!r}")
        if not isinstance(prefill_rows, str):
            prefill_rows = tuple(int(r) for r in prefill_rows)
        if hidden_rows not in ("all", "last"):
            raise ValueError(f"hidden_rows must be 'all' or 'last', got {hidden_rows!r}")
        if reduce_heads not in (None, "mean"):
            raise ValueError(f"reduce_heads must be None or 'mean', got {reduce_heads!r}")
        self.layers = None if layers is None else frozenset(int(x) for x in layers)
        self.prefill_rows = prefill_rows
        self.reduce_heads = reduce_heads
        self.hidden_layers = frozenset(int(x) for x in hidden_layers)
        self.hidden_rows = hidden_rows
        self.attention: dict[int, list[torch.Tensor]] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {}

    def wants_attention(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def wants_hidden(self, index: int) -> bool:
        return index in self.hidden_layers

    def add_attention(self, layer: int, rows: torch.Tensor) -> None:
        """rows: [B, H, q, N] probabilities of q query rows on the N image keys."""
        if self.reduce_heads == "mean":
            rows = rows.mean(1, keepdim=True)
        self.attention.setdefault(layer, []).append(rows)

    def add_hidden(self, index: int, hidden: torch.Tensor) -> None:
        """hidden: [B, T, D] for one forward call; the prefill keeps `hidden_rows`."""
        if hidden.shape[1] > 1 and self.hidden_rows == "last":
            hidden = hidden[:, -1:]
        self.hidden.setdefault(index, []).append(hidden.detach())

    def image_attention(self, layer: int) -> torch.Tensor:
        """[B, H|1, S, N]: recorded rows of `layer` in order (prefill rows, then one per decode step)."""
        if layer not in self.attention:
            raise KeyError(f"layer {layer} was not recorded; recorded: {sorted(self.attention)}")
        return torch.cat(self.attention[layer], dim=2)

    def hidden_states(self, index: int) -> torch.Tensor:
        """[B, S, D]: captured hidden states at `index` (prefill rows, then one per decode step)."""
        if index not in self.hidden:
            raise KeyError(f"hidden state {index} was not captured; captured: {sorted(self.hidden)}")
        return torch.cat(self.hidden[index], dim=1)

    def recorded_layers(self) -> list[int]:
        return sorted(self.attention)
