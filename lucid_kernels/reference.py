"""The readable reference of Lucid's edited attention: the spec every fast kernel is tested against.

One call computes causal (or masked) attention for a batch with two optional extras:

* an `AttentionEdit`, applied in this order:
  1. pre-softmax logit edits on key sets, per head (and optionally per batch row), each to the logits
     the previous one left: `z <- z + abs_scale[h] * |z| + bias[h]` on the set's keys, chosen query rows
     (PAI, the imbalanced-attention fix's local and summary tokens);
  2. a post-softmax redistribution between key sets (VAR): where a row passes a gate, a fraction f[h]
     of the mass on the source keys moves onto the target keys in proportion to their attention;
  3. a per-head scale of the output before o_proj (VHR);
* a read-out of the post-softmax probabilities (after every edit) of chosen query rows on chosen key
  columns (the attention recorder's "image-attention rows"), without returning the full matrix.

Nothing here needs the full attention matrix on a fast path: the logit edits are elementwise on z; the
redistribution is, per row, `o' = o + g * f * (S / N * o_T - o_S)` with the masses S (source), N
(target), I (gate set) and the partial outputs o_S, o_T = sum over the source / target keys of p * v,
all of which a flash-style pass accumulates alongside o (checked by a test).

Coefficients are [H] (every batch row) or [B, H] (per batch row: per-sample head choices).
Everything is computed in fp32 and cast back to the query dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyEdit:
    """A pre-softmax edit of one key set: `z <- z + abs_scale * |z| + bias` on its keys and rows.

    Attributes:
        key_mask: [B, Tk0] bool, the key set edited (keys past Tk0, i.e. generated tokens, are not).
        rows: "all" edits every query row; "last" only the last one (in decode, the only one).
        abs_scale: [H] or [B, H], or None.
        bias: [H] or [B, H], or None.
    """

    key_mask: torch.Tensor
    rows: str = "all"
    abs_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.rows not in ("all", "last"):
            raise ValueError(f"rows must be 'all' or 'last', got {self.rows!r}")


@dataclass(frozen=True)
class Redistribution:
    """A post-softmax move of attention mass between key sets, per row and head (VAR).

    For each edited row and head with probabilities p: S = sum_source p, N = sum_target p,
    I = sum_gate p. The row passes the gate when I >= min_gate_mass, N >= min_target_ratio * I and
    N > 0; then p_j *= (1 - f) on the source keys and p_j += f * S * p_j / N on the target keys (the row
    still sums to 1). Source and target must be disjoint.

    Attributes:
        source: [B, Tk0] bool, keys that give (VAR: every sink token, text and image).
        target: [B, Tk0] bool, keys that receive in proportion to their attention (VAR: non-sink image tokens).
        gate_keys: [B, Tk0] bool, the set whose mass the gate tests (VAR: the image tokens).
        fraction: [H] or [B, H], f: the share of the source mass moved.
        min_gate_mass: the gate's I threshold (VAR: 0.2).
        min_target_ratio: the gate's N / I threshold (VAR: rho).
        row_start: [B] long or None: only query rows at absolute position >= row_start[b] are edited
            (VAR: the rows after the image); None edits every row. Decode rows are past every prompt position.
    """

    source: torch.Tensor
    target: torch.Tensor
    gate_keys: torch.Tensor
    fraction: torch.Tensor
    min_gate_mass: float = 0.0
    min_target_ratio: float = 0.0
    row_start: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionEdit:
    """Edits of one layer's attention for one batch. Tensors live on the attention's device.

    The first key set's edit can be given inline (`key_mask`, `rows`, `abs_scale`, `bias`); further
    ones in `keys`. All logit edits apply in that order (see `key_edits`), then the redistribution,
    then the head scale.

    Attributes:
        key_mask: [B, Tk0] bool or None, the first key set edited.
        rows: "all" or "last", the first key set's rows.
        abs_scale: [H] or [B, H] or None; adds abs_scale[h] * |z| to the first set's logits.
        bias: [H] or [B, H] or None; adds bias[h] to the first set's logits.
        head_scale: [H] or [B, H] or None; multiplies head h's output (before o_proj).
        keys: further `KeyEdit`s, applied in order after the first.
        redistribute: a post-softmax `Redistribution`, or None.
    """

    key_mask: torch.Tensor | None = None
    rows: str = "all"
    abs_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None
    keys: tuple[KeyEdit, ...] = ()
    redistribute: Redistribution | None = None

    def __post_init__(self) -> None:
        if self.rows not in ("all", "last"):
            raise ValueError(f"rows must be 'all' or 'last', got {self.rows!r}")
        if self.key_mask is None and (self.abs_scale is not None or self.bias is not None):
            raise ValueError("abs_scale / bias need a key_mask (the key set they edit)")

    @property
    def key_edits(self) -> tuple[KeyEdit, ...]:
        """Every logit edit, in the order applied."""
        first = ()
        if self.key_mask is not None and (self.abs_scale is not None or self.bias is not None):
            first = (KeyEdit(self.key_mask, self.rows, self.abs_scale, self.bias),)
        return first + tuple(self.keys)

    @property
    def edits_logits(self) -> bool:
        return bool(self.key_edits)


def per_head(coef: torch.Tensor) -> torch.Tensor:
    """[H] -> [1, H, 1, 1]; [B, H] -> [B, H, 1, 1] (broadcasts over [B, H, Tq, Tk])."""
    coef = coef.float()
    return coef[None, :, None, None] if coef.dim() == 1 else coef[:, :, None, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def allowed_keys(mask: torch.Tensor | None, tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Boolean [B|1, 1|H, Tq, Tk] of the keys each query may see.

    `mask` is what transformers' sdpa mask function produced: a boolean mask (True = attend), an
    additive float mask, or None, meaning plain causal attention aligned to the bottom right (the
    queries are the last Tq positions of the Tk keys).
    """
    if mask is None:
        q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
        return (torch.arange(tk, device=device)[None, :] <= q_pos)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


Rows = str | tuple[int, ...]


def select_rows(tq: int, rows: Rows, device: torch.device) -> torch.Tensor:
    """[Tq] bool: the query rows that `rows` names: "all", "last", or a tuple of prompt positions.

    A decode step (Tq == 1) has one row, the new token's, and it is always selected.
    """
    sel = torch.zeros(tq, dtype=torch.bool, device=device)
    if rows == "all" or tq == 1:
        sel[:] = True
    elif rows == "last":
        sel[-1] = True
    else:
        idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        if idx.numel() and (int(idx.min()) < -tq or int(idx.max()) >= tq):
            raise IndexError(f"row positions {tuple(rows)} out of range for {tq} query rows")
        sel[idx] = True
    return sel


def pad_keys(key_mask: torch.Tensor, tk: int) -> torch.Tensor:
    """Extend a [B, Tk0] key mask to [B, Tk] with False (generated tokens are never in a key set)."""
    if key_mask.shape[-1] >= tk:
        return key_mask[:, :tk]
    pad = torch.zeros(key_mask.shape[0], tk - key_mask.shape[-1], dtype=torch.bool, device=key_mask.device)
    return torch.cat([key_mask, pad], dim=-1)


def edited_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    edit: AttentionEdit | None = None,
    record_index: torch.Tensor | None = None,
    record_rows: Rows = "all",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with an optional logit edit and an optional probability read-out.

    Args:
        query: [B, H, Tq, D].
        key, value: [B, Hkv, Tk, D] with H % Hkv == 0.
        mask: see `allowed_keys`.
        scale: softmax scale (usually D ** -0.5).
        edit: see `AttentionEdit`.
        record_index: [B, N] long key indices to read out (-1 = padding, read as 0).
        record_rows: the query rows read out (see `select_rows`).

    Returns:
        output [B, Tq, H, D] in the query's dtype, and the read-out [B, H, Tq_sel, N] (fp32) or None.
    """
    b, h, tq, _ = query.shape
    tk = key.shape[2]
    k = repeat_kv(key, h // key.shape[1]).float()
    v = repeat_kv(value, h // value.shape[1]).float()
    z = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale  # [B, H, Tq, Tk]
    if edit is not None:
        for ke in edit.key_edits:  # in order: each edits the logits the previous one left
            target = (
                pad_keys(ke.key_mask, tk)[:, None, None, :] & select_rows(tq, ke.rows, z.device)[None, None, :, None]
            )
            delta = torch.zeros_like(z)
            if ke.abs_scale is not None:
                delta = delta + per_head(ke.abs_scale) * z.abs()
            if ke.bias is not None:
                delta = delta + per_head(ke.bias)
            z = torch.where(target, z + delta, z)
    allowed = allowed_keys(mask, tq, tk, z.device)
    z = z.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)  # fully masked rows (padding queries) -> 0
    if edit is not None and edit.redistribute is not None:
        p = redistribute_reference(p, edit.redistribute)
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    if edit is not None and edit.head_scale is not None:
        out = out * per_head(edit.head_scale)
    rows = None
    if record_index is not None:
        sel = p[:, :, select_rows(tq, record_rows, p.device)]  # [B, H, Tq_sel, Tk]
        idx = record_index.clamp(min=0)[:, None, None, :].expand(b, h, sel.shape[2], -1)
        rows = torch.gather(sel, 3, idx) * (record_index >= 0)[:, None, None, :]
    return out.transpose(1, 2).to(query.dtype), rows


def redistribute_reference(p: torch.Tensor, r: Redistribution) -> torch.Tensor:
    """Apply a `Redistribution` to probabilities p [B, H, Tq, Tk] (queries = the last Tq of Tk positions)."""
    _, _, tq, tk = p.shape
    src = pad_keys(r.source, tk)[:, None, None, :].float()  # [B, 1, 1, Tk]
    dst = pad_keys(r.target, tk)[:, None, None, :].float()
    gate_keys = pad_keys(r.gate_keys, tk)[:, None, None, :].float()
    s_mass = (p * src).sum(-1, keepdim=True)  # [B, H, Tq, 1]
    n_mass = (p * dst).sum(-1, keepdim=True)
    i_mass = (p * gate_keys).sum(-1, keepdim=True)
    gate = (i_mass >= r.min_gate_mass) & (n_mass >= r.min_target_ratio * i_mass) & (n_mass > 0)
    if r.row_start is not None:
        q_pos = torch.arange(tk - tq, tk, device=p.device)  # absolute position of each query row
        gate = gate & (q_pos[None, :] >= r.row_start[:, None])[:, None, :, None]
    f = torch.where(gate, per_head(r.fraction), 0.0)  # [B, H, Tq, 1]
    return p * (1 - f * src) + p * dst * (f * s_mass / n_mass.clamp_min(1e-30))


def attention_rows_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    record_index: torch.Tensor,
    record_rows: Rows = "all",
) -> torch.Tensor:
    """Only the read-out of `edited_attention_reference` (no edit, no output): cost O(Tq_sel * Tk)."""
    b, h, tq, _ = query.shape
    tk = key.shape[2]
    sel_rows = select_rows(tq, record_rows, query.device)
    q = query[:, :, sel_rows].float()
    k = repeat_kv(key, h // key.shape[1]).float()
    z = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    allowed = allowed_keys(mask, tq, tk, z.device)
    allowed = allowed[:, :, sel_rows] if allowed.shape[2] == tq else allowed
    p = torch.softmax(z.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    idx = record_index.clamp(min=0)[:, None, None, :].expand(b, h, p.shape[2], -1)
    return torch.gather(p, 3, idx) * (record_index >= 0)[:, None, None, :]
