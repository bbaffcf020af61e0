"""Fused Triton kernel for Lucid's edited attention: the contract of `lucid_kernels.reference`, flash style.

One kernel serves prefill and KV-cache decode (a decode step is one query row): per (batch, head) and
block of query rows it streams the key blocks with an online softmax and never holds the [Tq, Tk]
matrix. On each key block it applies, in order, the pre-softmax logit edits of every key set
(`z += a[h] * |z| + b[h]` on the set's keys and rows), the attention mask (transformers' boolean /
additive mask, any of its dims broadcast, or causal aligned bottom-right: then the key blocks past the
block's last query are skipped), and accumulates beside the usual (m, l, o) what VAR's redistribution
needs: the masses S, N, I on the source, target and gate key sets and the partial outputs o_S, o_T. At
the end of the row: o = o / l, then o += g * f * (S / N * o_T - o_S) where the gate g holds, then the
per-head output scale. Fully masked rows (left-padding queries) give 0, like the reference. GQA indexes
the KV head (h // (H / Hkv)); query, key and value are read through their strides (transformers' query
is a transposed view), the output is written [B, Tq, H, D] in the query's dtype.

The recorder's read-out (post-edit probabilities of chosen rows on chosen key columns) is computed from
the kernel's saved row statistics (max, normaliser, redistribution factor and ratio) for the recorded
columns only: O(B x H x rows x N x D), never the full matrix (`_readout`).

Numerics: softmax statistics, masses and accumulators are fp32 whatever the input dtype; on GPU the matrix
products take bf16 / fp16 operands as they come (the flash-attention convention: q k^T is exact products
with fp32 accumulation; p is rounded to the input dtype for p v) and fp32 operands exactly ("ieee", no
TF32). Triton's interpreter cannot do bf16 arithmetic, so there the inputs are upcast to fp32 first and the
output is cast back by torch (round to nearest, like the reference).

Interpreter or compiled is a per-process choice: Triton jits its standard library (`tl.max`, `tl.sum`) at
`import triton` for the mode TRITON_INTERPRET names then, and the kernel here is jitted to match it
(`interpreting`). `compile_for` compiles the kernel for an NVIDIA target without a GPU (bundled ptxas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lucid_kernels.reference import AttentionEdit, Rows, allowed_keys, pad_keys, repeat_kv, select_rows

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - Triton is a Linux dependency; its absence is reported by dispatch
    HAVE_TRITON = False

MASK_CAUSAL, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


def _stdlib_interpreted() -> bool:
    """Whether triton was imported in interpreter mode: its standard library (`tl.max`, `tl.sum`) is jitted
    once, at `import triton`, for the mode TRITON_INTERPRET named then; a kernel can only run in that mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(tl.max, InterpretedFunction):
        return True
    if isinstance(tl.max, JITFunction):
        return False
    return bool(triton.knobs.runtime.interpret)  # pragma: no cover - a Triton whose tl.max is not jitted


INTERPRETED = HAVE_TRITON and _stdlib_interpreted()


def interpreting() -> bool:
    """Whether kernels can run in Triton's CPU interpreter here: TRITON_INTERPRET=1 was set when triton was
    imported (the kernel is jitted for that mode) and still is (Triton reads it again when it launches)."""
    return INTERPRETED and bool(triton.knobs.runtime.interpret)


def _edited_attention_fwd(
    Q, K, V, OUT, M_OUT, L_OUT, G_OUT, R_OUT,
    MASK, KEYSETS, COEFS, VAR_SETS, FRAC, ROW_START, HSCALE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    B, H, TQ, TK, D, N_REP, TK0, TK0_VAR, scale, mask_min, min_gate, min_ratio,
    N_EDITS: tl.constexpr, LAST_ROWS: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_REDIST: tl.constexpr, HAS_ROW_START: tl.constexpr, HAS_HSCALE: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (block of query rows, batch x head) program. The logit edits' key sets are [E, B, TK0] uint8, their
    coefficients [2E, B, H] fp32 (abs scale, bias per edit); the redistribution's source, target and gate
    sets [3, B, TK0_VAR] uint8, its fraction [B, H]; keys past a set's length are outside it. Bit e of
    LAST_ROWS set = edit e edits the last query row only. Writes OUT [B, TQ, H, D] and, if STORE_STATS, the row max m,
    normaliser l, redistribution factor g*f and ratio S/N ([B, H, TQ] each) for the read-out."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // N_REP  # GQA: the KV head serving query head h (as `repeat_kv` orders them)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < TQ
    d_ok = dims < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    q_pos = rows + (TK - TQ)  # absolute position of each query row among the keys
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)  # VAR: source, target and gate masses, unnormalised
    n_i = tl.zeros([BLOCK_M], tl.float32)
    i_i = tl.zeros([BLOCK_M], tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # VAR: partial outputs on the source / target keys
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if MASK_KIND == 0:  # causal: no key past this block's last query row
        hi = tl.minimum((pid_m + 1) * BLOCK_M + (TK - TQ), TK)
    else:
        hi = TK
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < TK
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N], fp32
        for e in tl.static_range(N_EDITS):  # in order: each edits the logits the previous one left
            in_set = tl.load(KEYSETS + (e * B + b) * TK0 + cols, mask=cols < TK0, other=0) != 0
            a = tl.load(COEFS + ((2 * e) * B + b) * H + h)
            c = tl.load(COEFS + ((2 * e + 1) * B + b) * H + h)
            if (LAST_ROWS >> e) & 1:
                sel = (rows == TQ - 1)[:, None] & in_set[None, :]
            else:
                sel = in_set[None, :]
            z = tl.where(sel, z + a * tl.abs(z) + c, z)
        if MASK_KIND == 0:
            ok = cols[None, :] <= q_pos[:, None]
        else:
            mv = tl.load(MASK + b * stride_mb + h * stride_mh + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)  # fmt: skip
            if MASK_KIND == 1:
                ok = mv != 0
            else:
                ok = mv.to(tl.float32) > mask_min
        ok = ok & col_ok[None, :] & row_ok[:, None]
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if HAS_REDIST:
            in_var = cols < TK0_VAR
            src = (tl.load(VAR_SETS + b * TK0_VAR + cols, mask=in_var, other=0) != 0).to(tl.float32)
            dst = (tl.load(VAR_SETS + (B + b) * TK0_VAR + cols, mask=in_var, other=0) != 0).to(tl.float32)
            gk = (tl.load(VAR_SETS + (2 * B + b) * TK0_VAR + cols, mask=in_var, other=0) != 0).to(tl.float32)
            p_src = p * src[None, :]
            p_dst = p * dst[None, :]
            s_i = s_i * alpha + tl.sum(p_src, 1)
            n_i = n_i * alpha + tl.sum(p_dst, 1)
            i_i = i_i * alpha + tl.sum(p * gk[None, :], 1)
            acc_s = acc_s * alpha[:, None] + tl.dot(p_src.to(v.dtype), v, input_precision=PRECISION)
            acc_t = acc_t * alpha[:, None] + tl.dot(p_dst.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # fully masked row: everything is 0, so is the output
    o = acc / l_safe[:, None]
    g_f = tl.zeros([BLOCK_M], tl.float32)
    ratio = tl.zeros([BLOCK_M], tl.float32)
    if HAS_REDIST:
        s_m = s_i / l_safe
        n_m = n_i / l_safe
        i_m = i_i / l_safe
        gate = (i_m >= min_gate) & (n_m >= min_ratio * i_m) & (n_m > 0)
        if HAS_ROW_START:
            gate = gate & (q_pos >= tl.load(ROW_START + b))
        g_f = tl.where(gate, tl.load(FRAC + b * H + h), 0.0)
        ratio = tl.where(gate, s_m / tl.maximum(n_m, 1e-30), 0.0)  # the reference's clamp_min(1e-30)
        o = o + g_f[:, None] * (ratio[:, None] * acc_t - acc_s) / l_safe[:, None]
    if HAS_HSCALE:
        o = o * tl.load(HSCALE + b * H + h)
    out_off = ((b * TQ + rows[:, None]) * H + h) * D + dims[None, :]  # [B, Tq, H, D], as the reference
    tl.store(OUT + out_off, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_STATS:
        stat = (b * H + h) * TQ + rows
        tl.store(M_OUT + stat, m_i, mask=row_ok)
        tl.store(L_OUT + stat, l_i, mask=row_ok)
        tl.store(G_OUT + stat, g_f, mask=row_ok)
        tl.store(R_OUT + stat, ratio, mask=row_ok)


if HAVE_TRITON:  # jitted for the mode triton was imported in (whatever TRITON_INTERPRET says now)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _kernel = (InterpretedFunction if INTERPRETED else JITFunction)(_edited_attention_fwd)


def _coef(c: torch.Tensor | None, b: int, h: int, fill: float, device: torch.device) -> torch.Tensor:
    """[H] / [B, H] / None -> [B, H] fp32 contiguous."""
    if c is None:
        return torch.full((b, h), fill, dtype=torch.float32, device=device)
    c = c.to(device=device, dtype=torch.float32)
    return (c[None].expand(b, h) if c.dim() == 1 else c.expand(b, h)).contiguous()


def _coefs(cs: list[torch.Tensor | None], b: int, h: int, device: torch.device) -> torch.Tensor:
    """[H] / [B, H] / None (= 0) coefficients -> one [len(cs), B, H] fp32 tensor (one copy)."""
    zero = torch.zeros((), device=device).expand(b, h)
    return torch.stack([zero if c is None else c.to(device, torch.float32).expand(b, h) for c in cs])


def _key_sets(masks: list[torch.Tensor], b: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """[B|1, Tk0] bool key sets -> one [len(masks), B, Tk0] uint8 tensor (one copy) and Tk0. Not padded to
    the keys' length: the kernel reads keys past Tk0 (generated tokens) as outside every set."""
    tk0 = max(m.shape[-1] for m in masks)
    parts = [m.to(device, torch.bool).expand(b, -1) for m in masks]
    return torch.stack([p if p.shape[-1] == tk0 else pad_keys(p, tk0) for p in parts]).view(torch.uint8), tk0


def default_config(tq: int, dtype: torch.dtype, redistribute: bool) -> dict[str, int]:
    """Block sizes and launch options (chosen by compiling for sm_90 at D = 128 and keeping the larger tiles
    that ptxas reports no register spills for: `python -m lucid.bench.kernels --compile-report`; not timed).

    Decode-sized calls get 16 query rows (the smallest tile `tl.dot` takes on a GPU); the redistribution's
    two extra [M, D] accumulators get 32-row tiles and 8 warps in prefill; fp32 operands (exact "ieee" dots,
    the test path) get 16 x 32 tiles."""
    if dtype == torch.float32:
        return {"block_m": 16, "block_n": 32, "num_warps": 8, "num_stages": 2}
    if tq <= 16:
        return {"block_m": 16, "block_n": 64, "num_warps": 8 if redistribute else 4, "num_stages": 2}
    return {"block_m": 32 if redistribute else 64, "block_n": 64, "num_warps": 8, "num_stages": 2}


@dataclass
class _Launch:
    """Everything one kernel call needs: positional args, constexprs, launch options, grid, outputs."""

    args: list
    constexprs: dict
    options: dict
    grid: tuple[int, int]
    out: torch.Tensor
    stats: list[torch.Tensor]


def _prepare(query, key, value, mask, scale, edit, store_stats: bool, overrides: dict, interp: bool) -> _Launch:
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if h % hkv or value.shape[:3] != key.shape[:3] or key.shape[3] != d or value.shape[3] != d:
        raise ValueError(
            f"shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} "
            "(need [B, H, Tq, D], [B, Hkv, Tk, D] x2 with H % Hkv == 0)"
        )
    dev = query.device
    # the interpreter cannot do bf16 / fp16 arithmetic: upcast there; on GPU operands stay in their dtype
    q, k, v = (t.float() for t in (query, key, value)) if interp else (query, key, value)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty(b, tq, h, d, dtype=torch.float32 if interp else query.dtype, device=dev)
    dummy_f = torch.empty(1, dtype=torch.float32, device=dev)  # stand-ins for pointers a constexpr leaves unread
    dummy_i = torch.empty(1, dtype=torch.int8, device=dev)
    # m, l, g * f and S / N per row, for the read-out; not written without one
    stats = [torch.empty(b, h, tq, dtype=torch.float32, device=dev) for _ in range(4)] if store_stats else [dummy_f] * 4

    mask_kind, mask_t, mask_min, mask_strides = MASK_CAUSAL, dummy_i, 0.0, (0, 0, 0, 0)
    if mask is not None:
        mask_t = mask.to(dev).expand(b, h, tq, tk)  # broadcast dims get stride 0; a bad shape raises here
        if mask_t.dtype == torch.bool:
            mask_kind, mask_t = MASK_BOOL, mask_t.view(torch.uint8)
        else:
            mask_kind, mask_min = MASK_ADDITIVE, torch.finfo(mask_t.dtype).min / 2  # as `allowed_keys`
            if interp and mask_t.dtype != torch.float32:
                mask_t = mask_t.float()
        mask_strides = mask_t.stride()

    edits = edit.key_edits if edit is not None else ()
    keysets, tk0, coefs = dummy_i, 1, dummy_f
    if edits:
        keysets, tk0 = _key_sets([e.key_mask for e in edits], b, dev)  # [E, B, Tk0]
        coefs = _coefs([c for e in edits for c in (e.abs_scale, e.bias)], b, h, dev)  # [2E, B, H]: a, b per edit

    r = edit.redistribute if edit is not None else None
    var_sets, tk0_var, frac, row_start, min_gate, min_ratio = dummy_i, 1, dummy_f, dummy_i, 0.0, 0.0
    if r is not None:
        var_sets, tk0_var = _key_sets([r.source, r.target, r.gate_keys], b, dev)  # [3, B, Tk0]
        frac = _coef(r.fraction, b, h, 0.0, dev)
        if r.row_start is not None:
            row_start = r.row_start.to(dev, torch.int32).expand(b).contiguous()
        min_gate, min_ratio = float(r.min_gate_mass), float(r.min_target_ratio)
    hs = edit.head_scale if edit is not None else None
    hscale = _coef(hs, b, h, 1.0, dev) if hs is not None else dummy_f

    cfg = default_config(tq, q.dtype, r is not None)
    if interp:  # the interpreter's cost is per program and key block, not per element: fewer, larger tiles
        cfg.update(block_m=min(64, max(16, triton.next_power_of_2(tq))), block_n=64)
    cfg.update({name: val for name, val in overrides.items() if val is not None})
    args = [
        q, k, v, out, *stats,
        mask_t, keysets, coefs, var_sets, frac, row_start, hscale,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        b, h, tq, tk, d, h // hkv, tk0, tk0_var, float(scale), float(mask_min), min_gate, min_ratio,
    ]  # fmt: skip
    constexprs = {
        "N_EDITS": len(edits),
        "LAST_ROWS": sum(1 << i for i, e in enumerate(edits) if e.rows == "last"),  # bit i: edit i, last row only
        "MASK_KIND": mask_kind,
        "HAS_REDIST": r is not None,
        "HAS_ROW_START": r is not None and r.row_start is not None,
        "HAS_HSCALE": hs is not None,
        "STORE_STATS": store_stats,
        "BLOCK_M": cfg["block_m"],
        "BLOCK_N": cfg["block_n"],
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # fp32: exact; bf16 / fp16: ignored
    }
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return _Launch(args, constexprs, options, (triton.cdiv(tq, cfg["block_m"]), b * h), out, stats)


def edited_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    edit: AttentionEdit | None = None,
    record_index: torch.Tensor | None = None,
    record_rows: Rows = "all",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lucid_kernels.reference.edited_attention_reference`, fused: same arguments, same results (output
    [B, Tq, H, D] in the query's dtype, read-out [B, H, Tq_sel, N] fp32 or None). The keyword-only
    arguments override `default_config`."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not importable")
    overrides = {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
    run = _prepare(query, key, value, mask, scale, edit, record_index is not None, overrides, INTERPRETED)
    _kernel[run.grid](*run.args, **run.constexprs, **run.options)
    rows_out = None
    if record_index is not None:
        rows_out = _readout(query, key, mask, scale, edit, record_index, record_rows, *run.stats)
    out = run.out
    return out if out.dtype == query.dtype else out.to(query.dtype), rows_out


_TRITON_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32",
}  # fmt: skip


def compile_for(query, key, value, mask, scale, edit=None, record: bool = False, arch: int = 90, **overrides):
    """Compile (never run) the kernel for an NVIDIA target as the call on these tensors would launch it: no
    GPU needed (Triton's bundled ptxas). Returns Triton's compiled kernel (`.asm["ptx"]`, `.metadata`).
    Tensors may live on the CPU (or the meta device): only their dtypes, shapes and strides are used."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_for needs a process that imported triton without TRITON_INTERPRET")
    run = _prepare(query, key, value, mask, scale, edit, record, overrides, interp=False)
    fn = _kernel
    names = [n for n in fn.arg_names if n not in run.constexprs]
    signature = {}
    for name, arg in zip(names, run.args, strict=True):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[arg.dtype]
        else:
            signature[name] = "fp32" if isinstance(arg, float) else "i32"
    signature.update({name: "constexpr" for name in run.constexprs})
    src = ASTSource(fn, signature, constexprs=run.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=run.options)


def _row_index(tq: int, rows: Rows, device: torch.device) -> torch.Tensor:
    """[R] long: the query rows `select_rows` names, ascending ("all" / "last" built on the device: no sync)."""
    if rows == "all" or tq == 1:
        return torch.arange(tq, device=device)
    if rows == "last":
        return torch.arange(tq - 1, tq, device=device)
    return select_rows(tq, rows, torch.device("cpu")).nonzero()[:, 0].to(device)


def _in_set(key_set: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Membership of key columns `idx` [B, N] in a [B|1, Tk0] key set (columns past Tk0 are outside): [B, N]."""
    tk0 = key_set.shape[-1]
    ks = key_set.to(idx.device).expand(idx.shape[0], tk0)
    return torch.gather(ks, 1, idx.clamp(max=tk0 - 1)) & (idx < tk0)


def _allowed_at(mask: torch.Tensor | None, rows: torch.Tensor, idx: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """`allowed_keys` at query rows `rows` [R] and key columns `idx` [B, N] only: [B, 1|H, R, N] bool."""
    if mask is None:
        return (idx[:, None, :] <= (rows + (tk - tq))[None, :, None])[:, None]
    b, n = idx.shape
    m = mask.to(idx.device)
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))  # as broadcasting would read a lower-rank mask
    m = m.expand(b, m.shape[1], tq, tk)[:, :, rows]  # [B, 1|H, R, Tk]: the recorded rows only
    m = torch.gather(m, 3, idx[:, None, None, :].expand(b, m.shape[1], len(rows), n))
    return allowed_keys(m, len(rows), n, idx.device)


def _readout(query, key, mask, scale, edit, record_index, record_rows, m, norm, g_f, ratio) -> torch.Tensor:
    """Post-edit probabilities of the selected rows on the recorded columns, from the kernel's row stats:
    p = exp(z' - m) / l with z' the edited logit recomputed on those columns only, then the redistribution's
    per-row factors (1 - g f on source keys, 1 + g f S / N on target keys). [B, H, R, N] fp32."""
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    dev = query.device
    rows = _row_index(tq, record_rows, dev)
    rec = record_index.to(dev)
    idx = rec.clamp(min=0)  # [B, N]
    n = idx.shape[1]
    kc = torch.gather(key, 2, idx[:, None, :, None].expand(b, hkv, n, d)).float()  # [B, Hkv, N, D]
    z = torch.einsum("bhqd,bhnd->bhqn", query[:, :, rows].float(), repeat_kv(kc, h // hkv)) * scale
    for e in edit.key_edits if edit is not None else ():
        in_set = _in_set(e.key_mask, idx)  # [B, N]
        row_ok = rows == tq - 1 if e.rows == "last" and tq > 1 else torch.ones_like(rows, dtype=torch.bool)
        target = in_set[:, None, None, :] & row_ok[None, None, :, None]
        delta = torch.zeros_like(z)
        if e.abs_scale is not None:
            delta = delta + _coef(e.abs_scale, b, h, 0.0, dev)[:, :, None, None] * z.abs()
        if e.bias is not None:
            delta = delta + _coef(e.bias, b, h, 0.0, dev)[:, :, None, None]
        z = torch.where(target, z + delta, z)
    ok = _allowed_at(mask, rows, idx, tq, tk)
    mr, lr = m[:, :, rows, None], norm[:, :, rows, None]
    live = lr > 0  # fully masked rows read 0
    p = torch.exp(z - torch.where(live, mr, 0.0)) / torch.where(live, lr, 1.0)
    p = torch.where(ok & live, p, 0.0)
    r = edit.redistribute if edit is not None else None
    if r is not None:
        src = _in_set(r.source, idx).float()[:, None, None, :]
        dst = _in_set(r.target, idx).float()[:, None, None, :]
        gf, rt = g_f[:, :, rows, None], ratio[:, :, rows, None]
        p = p * (1 - gf * src) + p * dst * (gf * rt)
    return p * (rec >= 0)[:, None, None, :]
