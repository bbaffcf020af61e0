"""The readable reference of Lucid's edited attention: the spec every fast kernel is tested against.

One call computes causal (or masked) attention for a batch with two optional extras:

* an `AttentionEdit` on the pre-softmax logits of a chosen key set (e.g. the image tokens) for chosen
  query rows, per head: `z <- z + abs_scale[h] * |z| + bias[h]`, and a per-head scale of the output;
* a read-out of the post-softmax probabilities of chosen query rows on chosen key columns (the
  attention recorder's "image-attention rows"), without returning the full matrix.

Everything is computed in fp32 and cast back to the query dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionEdit:
    """Edits of one layer's attention for one batch. Tensors live on the attention's device.

    Attributes:
        key_mask: [B, Tk0] bool, the key set edited (keys past Tk0, i.e. generated tokens, are not).
        rows: "all" edits every query row; "last" only the last one (in decode, the only one).
        abs_scale: [H] or None; adds abs_scale[h] * |z| to the selected logits.
        bias: [H] or None; adds bias[h] to the selected logits.
        head_scale: [H] or None; multiplies head h's output (before o_proj).
    """

    key_mask: torch.Tensor
    rows: str = "all"
    abs_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.rows not in ("all", "last"):
            raise ValueError(f"rows must be 'all' or 'last', got {self.rows!r}")

    @property
    def edits_logits(self) -> bool:
        return self.abs_scale is not None or self.bias is not None


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
    if edit is not None and edit.edits_logits:
        target = (
            pad_keys(edit.key_mask, tk)[:, None, None, :] & select_rows(tq, edit.rows, z.device)[None, None, :, None]
        )
        delta = torch.zeros_like(z)
        if edit.abs_scale is not None:
            delta = delta + edit.abs_scale.float()[None, :, None, None] * z.abs()
        if edit.bias is not None:
            delta = delta + edit.bias.float()[None, :, None, None]
        z = torch.where(target, z + delta, z)
    allowed = allowed_keys(mask, tq, tk, z.device)
    z = z.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)  # fully masked rows (padding queries) -> 0
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    if edit is not None and edit.head_scale is not None:
        out = out * edit.head_scale.float()[None, :, None, None]
    rows = None
    if record_index is not None:
        sel = p[:, :, select_rows(tq, record_rows, p.device)]  # [B, H, Tq_sel, Tk]
        idx = record_index.clamp(min=0)[:, None, None, :].expand(b, h, sel.shape[2], -1)
        rows = torch.gather(sel, 3, idx) * (record_index >= 0)[:, None, None, :]
    return out.transpose(1, 2).to(query.dtype), rows


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
