"""Fused Triton kernel for Lucid's edited attention: the contract of `kernels.reference`, flash style.

One kernel serves prefill and KV-cache decode (a decode step is one query row): per (batch, head) and
block of query rows it streams the key blocks with an online softmax and never holds the [Tq, Tk]
matrix. On each key block it applies, in order, the pre-softmax logit edits of every key set
(`z += a[h] * |z| + b[h]` on the set's keys and rows), the attention mask (transformers' boolean /
additive mask, or causal aligned bottom-right), and accumulates beside the usual (m, l, o) what VAR's
redistribution needs: the masses S, N, I on the source, target and gate key sets and the partial outputs
o_S, o_T. At the end of the row: o = o / l, then o += g * f * (S / N * o_T - o_S) where the gate g holds,
then the per-head output scale. Fully masked rows (left-padding queries) give 0, like the reference.

The recorder's read-out (post-edit probabilities of chosen rows on chosen key columns) is computed from
the kernel's saved row statistics (max, normaliser, redistribution factors) for the recorded columns
only: O(rows x N x D), never the full matrix (`_readout`).

Softmax statistics and accumulators are fp32 whatever the input dtype; on GPU the matrix products take
bf16 / fp16 operands as they come (the flash-attention convention) and fp32 operands exactly ("ieee", no
TF32); the interpreter cannot do bf16 arithmetic, so there inputs are upcast first. The output has the
query's dtype.
"""

from __future__ import annotations

import os

import torch

from kernels.reference import AttentionEdit, Rows, allowed_keys, pad_keys, repeat_kv, select_rows

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - Triton is a Linux dependency; its absence is reported by dispatch
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if HAVE_TRITON:

    @triton.jit
    def _edited_attention_fwd(
        Q, K, V, OUT, M_OUT, L_OUT, G_OUT, R_OUT,
        ALLOWED, KEYSETS, ABS, BIAS, ROWS_LAST,
        SRC, DST, GATE, FRAC, ROW_START, HSCALE,
        B, H, HKV, TQ, TK, D, scale, min_gate, min_ratio,
        N_EDITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REDIST: tl.constexpr, HAS_HSCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // (H // HKV)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < TQ
        d_ok = dims < D
        q = tl.load(Q + ((b * H + h) * TQ + rows[:, None]) * D + dims[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        q_pos = rows + (TK - TQ)  # absolute position of each query row among the keys
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        n_i = tl.zeros([BLOCK_M], tl.float32)
        i_i = tl.zeros([BLOCK_M], tl.float32)
        acc_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, TK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < TK
            kv_off = ((b * HKV + hk) * TK + cols[:, None]) * D + dims[None, :]
            k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            z = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # fp32 accumulation
            for e in tl.static_range(N_EDITS):
                in_set = tl.load(KEYSETS + (e * B + b) * TK + cols, mask=col_ok, other=0) != 0
                last_only = tl.load(ROWS_LAST + e)
                row_sel = (last_only == 0) | (rows == TQ - 1)
                a = tl.load(ABS + (e * B + b) * H + h)
                c = tl.load(BIAS + (e * B + b) * H + h)
                z = tl.where(row_sel[:, None] & in_set[None, :], z + a * tl.abs(z) + c, z)
            if HAS_MASK:
                ok = tl.load(ALLOWED + (b * TQ + rows[:, None]) * TK + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0) != 0  # fmt: skip
            else:
                ok = cols[None, :] <= q_pos[:, None]
            ok = ok & col_ok[None, :] & row_ok[:, None]
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(z - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            if HAS_REDIST:
                src = (tl.load(SRC + b * TK + cols, mask=col_ok, other=0) != 0).to(tl.float32)
                dst = (tl.load(DST + b * TK + cols, mask=col_ok, other=0) != 0).to(tl.float32)
                gk = (tl.load(GATE + b * TK + cols, mask=col_ok, other=0) != 0).to(tl.float32)
                p_src = p * src[None, :]
                p_dst = p * dst[None, :]
                s_i = s_i * alpha + tl.sum(p_src, 1)
                n_i = n_i * alpha + tl.sum(p_dst, 1)
                i_i = i_i * alpha + tl.sum(p * gk[None, :], 1)
                acc_s = acc_s * alpha[:, None] + tl.dot(p_src.to(v.dtype), v, input_precision=PRECISION)
                acc_t = acc_t * alpha[:, None] + tl.dot(p_dst.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        g_f = tl.zeros([BLOCK_M], tl.float32)
        ratio = tl.zeros([BLOCK_M], tl.float32)
        if HAS_REDIST:
            s_m = s_i / l_safe
            n_m = n_i / l_safe
            i_m = i_i / l_safe
            gate = (i_m >= min_gate) & (n_m >= min_ratio * i_m) & (n_m > 0) & (l_i > 0)
            gate = gate & (q_pos >= tl.load(ROW_START + b))
            f = tl.load(FRAC + b * H + h)
            g_f = tl.where(gate, f, 0.0)
            ratio = tl.where(gate, s_m / tl.where(n_m > 0, n_m, 1.0), 0.0)
            o = o + g_f[:, None] * (ratio[:, None] * acc_t / l_safe[:, None] - acc_s / l_safe[:, None])
        if HAS_HSCALE:
            o = o * tl.load(HSCALE + b * H + h)
        out_off = ((b * TQ + rows[:, None]) * H + h) * D + dims[None, :]  # [B, Tq, H, D], as the reference
        tl.store(OUT + out_off, o, mask=row_ok[:, None] & d_ok[None, :])
        stat = (b * H + h) * TQ + rows
        tl.store(M_OUT + stat, m_i, mask=row_ok)
        tl.store(L_OUT + stat, l_i, mask=row_ok)
        tl.store(G_OUT + stat, g_f, mask=row_ok)
        tl.store(R_OUT + stat, ratio, mask=row_ok)


def _coef(c: torch.Tensor | None, b: int, h: int, fill: float, device) -> torch.Tensor:
    """[H] / [B, H] / None -> [B, H] fp32 contiguous."""
    if c is None:
        return torch.full((b, h), fill, dtype=torch.float32, device=device)
    c = c.to(device=device, dtype=torch.float32)
    return (c[None].expand(b, h) if c.dim() == 1 else c).contiguous()


def edited_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    edit: AttentionEdit | None = None,
    record_index: torch.Tensor | None = None,
    record_rows: Rows = "all",
    block_m: int | None = None,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`kernels.reference.edited_attention_reference`, fused (same arguments, same results). `block_m`
    defaults to 16 query rows for decode-sized calls and 64 otherwise."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not importable")
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    dev = query.device
    # GPU: operands in their own dtype, fp32 accumulation and softmax (fp32 operands: exact "ieee" dots, no
    # TF32). The interpreter cannot do bf16/fp16 arithmetic: there everything is upcast to fp32 first.
    cast = (lambda t: t.float()) if (interpreting() or query.dtype == torch.float32) else (lambda t: t)
    q, k, v = (cast(t).contiguous() for t in (query, key, value))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    out = torch.empty(b, tq, h, d, dtype=torch.float32, device=dev)
    stats = [torch.empty(b, h, tq, dtype=torch.float32, device=dev) for _ in range(4)]
    dummy = torch.zeros(1, dtype=torch.int8, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    has_mask = mask is not None
    allowed = dummy
    if has_mask:
        a = allowed_keys(mask, tq, tk, dev)
        if a.shape[1] != 1:
            raise ValueError("the Triton kernel takes masks shared by all heads ([B, 1, Tq, Tk])")
        allowed = a[:, 0].expand(b, tq, tk).to(torch.int8).contiguous()
    edits = edit.key_edits if edit is not None else ()
    if edits:
        keysets = (
            torch.stack([pad_keys(e.key_mask.to(dev), tk).expand(b, tk) for e in edits]).to(torch.int8).contiguous()
        )
        abs_c = torch.stack([_coef(e.abs_scale, b, h, 0.0, dev) for e in edits]).contiguous()
        bias_c = torch.stack([_coef(e.bias, b, h, 0.0, dev) for e in edits]).contiguous()
        rows_last = torch.tensor([e.rows == "last" for e in edits], dtype=torch.int32, device=dev)
    else:
        keysets, abs_c, bias_c, rows_last = dummy, dummy_f, dummy_f, torch.zeros(1, dtype=torch.int32, device=dev)
    r = edit.redistribute if edit is not None else None
    if r is not None:
        src = pad_keys(r.source.to(dev), tk).expand(b, tk).to(torch.int8).contiguous()
        dst = pad_keys(r.target.to(dev), tk).expand(b, tk).to(torch.int8).contiguous()
        gk = pad_keys(r.gate_keys.to(dev), tk).expand(b, tk).to(torch.int8).contiguous()
        frac = _coef(r.fraction, b, h, 0.0, dev)
        row_start = (
            r.row_start.to(dev, torch.int32).contiguous()
            if r.row_start is not None
            else torch.full((b,), -(2**30), dtype=torch.int32, device=dev)
        )
        min_gate, min_ratio = float(r.min_gate_mass), float(r.min_target_ratio)
    else:
        src = dst = gk = dummy
        frac, row_start, min_gate, min_ratio = dummy_f, torch.zeros(1, dtype=torch.int32, device=dev), 0.0, 0.0
    hs = edit.head_scale if edit is not None else None
    hscale = _coef(hs, b, h, 1.0, dev) if hs is not None else dummy_f
    block_d = max(16, triton.next_power_of_2(d))
    block_m = block_m or (16 if tq <= 16 else 64)
    grid = (triton.cdiv(tq, block_m), b * h)
    _edited_attention_fwd[grid](
        q, k, v, out, *stats,
        allowed, keysets, abs_c, bias_c, rows_last,
        src, dst, gk, frac, row_start, hscale,
        b, h, hkv, tq, tk, d, float(scale), min_gate, min_ratio,
        N_EDITS=len(edits), HAS_MASK=has_mask, HAS_REDIST=r is not None, HAS_HSCALE=hs is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )  # fmt: skip
    rows_out = None
    if record_index is not None:
        rows_out = _readout(q.float(), k.float(), mask, scale, edit, record_index, record_rows, *stats)
    return out.to(query.dtype), rows_out


def _readout(q, k, mask, scale, edit, record_index, record_rows, m, norm, g_f, ratio) -> torch.Tensor:
    """Post-edit probabilities of the selected rows on the recorded columns, from the kernel's row stats."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    sel = select_rows(tq, record_rows, q.device)
    rows = sel.nonzero()[:, 0]
    idx = record_index.clamp(min=0).to(q.device)  # [B, N]
    kk = repeat_kv(k, h // k.shape[1])  # a view for Hkv == H; for GQA the gathered columns only are used
    kc = torch.gather(kk, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], kk.shape[-1]))  # [B, H, N, D]
    z = torch.einsum("bhqd,bhnd->bhqn", q[:, :, rows], kc) * scale  # [B, H, R, N]
    if edit is not None:
        for e in edit.key_edits:
            in_set = torch.gather(pad_keys(e.key_mask.to(q.device), tk).expand(b, tk), 1, idx)  # [B, N]
            row_ok = select_rows(tq, e.rows, q.device)[rows]
            target = in_set[:, None, None, :] & row_ok[None, None, :, None]
            delta = torch.zeros_like(z)
            if e.abs_scale is not None:
                delta = delta + _coef(e.abs_scale, b, h, 0.0, q.device)[:, :, None, None] * z.abs()
            if e.bias is not None:
                delta = delta + _coef(e.bias, b, h, 0.0, q.device)[:, :, None, None]
            z = torch.where(target, z + delta, z)
    allowed = allowed_keys(mask, tq, tk, q.device)
    allowed = allowed.expand(b, allowed.shape[1], tq, tk)[:, :, rows]  # [B, 1|H, R, Tk]
    ok = torch.gather(allowed, 3, idx[:, None, None, :].expand(b, allowed.shape[1], len(rows), idx.shape[1]))
    mr, lr = m[:, :, rows, None], norm[:, :, rows, None]
    p = torch.where(ok & (lr > 0), torch.exp(z - torch.where(torch.isinf(mr), 0.0, mr)) / lr.clamp_min(1e-30), 0.0)
    r = edit.redistribute if edit is not None else None
    if r is not None:
        src = torch.gather(pad_keys(r.source.to(q.device), tk).expand(b, tk), 1, idx).float()[:, None, None, :]
        dst = torch.gather(pad_keys(r.target.to(q.device), tk).expand(b, tk), 1, idx).float()[:, None, None, :]
        gf, rt = g_f[:, :, rows, None], ratio[:, :, rows, None]
        p = p * (1 - gf * src) + p * dst * gf * rt
    return p * (record_index >= 0).to(q.device)[:, None, None, :]
