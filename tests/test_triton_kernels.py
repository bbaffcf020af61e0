"""The fused Triton kernel against the readable reference (`lucid_kernels.reference`), case by case.

Without a GPU the kernel runs in Triton's interpreter. Triton jits its standard library (`tl.max`, `tl.sum`)
at `import triton` for the mode TRITON_INTERPRET names then, so this module sets TRITON_INTERPRET=1 around
the first import of triton, restores it, and sets it again around each test here (Triton reads it again at
launch): nothing leaks into other test modules. If triton was already imported compiled (in a larger run:
torch._dynamo imports it) and there is no GPU, one test runs this file again in a fresh process with
TRITON_INTERPRET=1 and the others are skipped here. With a GPU
the same tiny cases run compiled on CUDA (16-row tiles: the smallest `tl.dot` takes there), and the
`gpu`-marked tests compare at LLaVA-1.5 shapes. One test compiles the kernel for sm_90 without a GPU (in a
fresh process: Triton's bundled ptxas), which catches what only a real compile checks.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    _prior = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover
        pass
    finally:
        if _prior is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prior

pytest.importorskip("triton")
tat = pytest.importorskip("lucid_kernels.triton_attention")
if not tat.HAVE_TRITON:  # pragma: no cover
    pytest.skip("triton is not importable", allow_module_level=True)
# In a larger run something collected earlier has usually imported triton compiled already (torch._dynamo
# does, and transformers imports that): then, without a GPU, this file runs again in a fresh process with
# TRITON_INTERPRET=1 (`test_in_a_fresh_interpreter_process`) and its tests here are skipped.
RERUN = not CUDA and not tat.INTERPRETED

from lucid_kernels import dispatch  # noqa: E402
from lucid_kernels.reference import AttentionEdit, KeyEdit, Redistribution, edited_attention_reference  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
B, H, HKV, D = 2, 4, 2, 16
SMALL = {"block_m": 16, "block_n": 16} if CUDA else {"block_m": 8, "block_n": 8}  # several key blocks per row


@pytest.fixture(autouse=True)
def interpreter_env(request, monkeypatch):
    """TRITON_INTERPRET=1 during each test when interpreting: Triton reads it again at launch (lazy imports)."""
    if RERUN and request.node.originalname != "test_in_a_fresh_interpreter_process":
        pytest.skip("triton was imported compiled in this process: run by test_in_a_fresh_interpreter_process")
    if tat.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(not RERUN, reason="this process interprets (or compiles on CUDA): the tests run here")
def test_in_a_fresh_interpreter_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "test_in_a_fresh_interpreter_process" not in proc.stdout


def _case(tq, tk, seed=0, dtype=torch.float32, device=DEV, b=B, h=H, hkv=HKV, d=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(device, dtype)
    return q, k, v


def _padded_mask(tq, tk, pad, kind, device=DEV, dtype=torch.float32, b=B):
    """Causal (bottom-right) with batch row 1 left-padded by `pad` keys: in prefill its first `pad` query
    rows see nothing (their output is 0). `kind`: "bool" (True = attend) or "additive" (0 / dtype min)."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    allowed = (torch.arange(tk, device=device)[None, :] <= q_pos)[None, None].repeat(b, 1, 1, 1)
    allowed[1, :, :, :pad] = False
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _edits(tk0, kind, per_row, device=DEV, h=H, b=B):
    """An `AttentionEdit` over a tk0-token prompt (image tokens 2 .. tk0/2, sinks 0 and 4), coefficients
    [H] or (per_row) [B, H]. kind: None | logits | redistribute | head_scale | all."""
    g = torch.Generator().manual_seed(7)
    image = torch.zeros(b, tk0, dtype=torch.bool)
    image[:, 2 : tk0 // 2] = True
    local = torch.zeros(b, tk0, dtype=torch.bool)
    local[:, 3:6] = True
    text = ~image
    shape = (b, h) if per_row else (h,)

    def coef():
        return (torch.rand(shape, generator=g) * 0.8).to(device)

    image, local, text = image.to(device), local.to(device), text.to(device)
    if kind == "logits":  # three ordered edits on overlapping sets: both coefficients, abs only, bias only
        extra = (KeyEdit(local, "all", coef(), None), KeyEdit(text, "last", None, coef() - 0.4))
        return AttentionEdit(key_mask=image, rows="last", abs_scale=coef(), bias=coef() - 0.4, keys=extra)
    if kind == "redistribute":
        sink = torch.zeros(b, tk0, dtype=torch.bool, device=device)
        sink[:, 0] = True
        sink[:, 4] = True
        row_start = torch.tensor([2, 3] * (b // 2) + [2] * (b % 2), device=device)
        r = Redistribution(sink, image & ~sink, image, coef() + 0.2, 0.05, 0.1, row_start)
        return AttentionEdit(redistribute=r)
    if kind == "head_scale":
        return AttentionEdit(head_scale=coef() + 0.6)
    if kind == "all":
        a, r = _edits(tk0, "logits", per_row, device, h, b), _edits(tk0, "redistribute", per_row, device, h, b)
        return AttentionEdit(a.key_mask, a.rows, a.abs_scale, a.bias, coef() + 0.6, a.keys, r.redistribute)
    return None


def _record_index(tk, b=B, n=5, device=DEV):
    rec = torch.stack([torch.arange(n) * 2 % tk, (torch.arange(n) + 1) % tk] + [torch.arange(n) % tk] * (b - 2))
    rec[1, -1] = -1  # padding index, read as 0
    return rec.to(device)


def _compare(q, k, v, mask, edit, record_rows="all", atol=1e-5, rows_atol=1e-5, **blocks):
    rec = _record_index(k.shape[2], q.shape[0], device=q.device)
    scale = q.shape[-1] ** -0.5
    ref_o, ref_r = edited_attention_reference(q, k, v, mask, scale, edit, rec, record_rows)
    out, rows = tat.edited_attention_triton(q, k, v, mask, scale, edit, rec, record_rows, **blocks)
    assert out.dtype == q.dtype and out.shape == ref_o.shape
    torch.testing.assert_close(out.float(), ref_o.float(), atol=atol, rtol=atol)
    assert rows.dtype == torch.float32 and rows.shape == ref_r.shape
    torch.testing.assert_close(rows, ref_r, atol=rows_atol, rtol=rows_atol)
    return out, rows


@pytest.mark.parametrize("edit_kind", [None, "logits", "redistribute", "head_scale", "all"])
@pytest.mark.parametrize("per_row", [False, True], ids=["H", "BH"])
def test_prefill_causal_matches_reference(edit_kind, per_row):
    q, k, v = _case(13, 13)
    _compare(q, k, v, None, _edits(13, edit_kind, per_row), **SMALL)


@pytest.mark.parametrize("record_rows", ["all", "last", (0, 2, -1)], ids=["all", "last", "tuple"])
def test_prefill_after_a_cache_matches_reference(record_rows):
    """5 query rows after 24 cached keys: causal aligned bottom-right, edits on the 29 keys, each read-out."""
    q, k, v = _case(5, 29, seed=3)
    _compare(q, k, v, None, _edits(29, "all", False), record_rows=record_rows, **SMALL)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("edit_kind", [None, "all"])
def test_left_padded_prefill_matches_reference(mask_kind, edit_kind):
    q, k, v = _case(11, 11, seed=1)
    out, rows = _compare(q, k, v, _padded_mask(11, 11, 3, mask_kind), _edits(11, edit_kind, True), (0, 4, 10), **SMALL)
    assert out[1, :3].abs().max() == 0 and rows[1, :, 0].abs().max() == 0  # padding queries: 0, like the reference


@pytest.mark.parametrize("edit_kind", [None, "logits", "redistribute", "all"])
def test_decode_with_cache_matches_reference(edit_kind):
    """One query row over 37 cached keys, batch row 1 left-padded (the key sets cover the 30-token prompt)."""
    q, k, v = _case(1, 37, seed=2)
    _compare(q, k, v, _padded_mask(1, 37, 4, "bool"), _edits(30, edit_kind, True), record_rows="last", **SMALL)


def test_decode_without_mask_all_rows_readout():
    q, k, v = _case(1, 21, seed=5)
    _compare(q, k, v, None, _edits(21, "all", False), record_rows="all", **SMALL)


def test_redistribution_gate_is_exercised_both_ways():
    """The case the redistribution tests use has rows that pass the gate and rows that do not (row_start,
    thresholds), so both branches of the kernel's gate are compared."""
    q, k, v = _case(13, 13)
    edit = _edits(13, "redistribute", True)
    plain, _ = edited_attention_reference(q, k, v, None, D**-0.5)
    moved, _ = edited_attention_reference(q, k, v, None, D**-0.5, edit)
    changed = (moved - plain).abs().amax(-1) > 1e-6  # [B, Tq, H]
    assert changed.any() and not changed.all() and not changed[0, :2].any() and not changed[1, :3].any()
    gated = AttentionEdit(redistribute=Redistribution(*[getattr(edit.redistribute, f) for f in ("source", "target",
                          "gate_keys", "fraction")], min_gate_mass=0.3, min_target_ratio=0.6))  # fmt: skip
    _compare(q, k, v, None, gated, **SMALL)


def test_per_head_and_broadcast_masks():
    q, k, v = _case(6, 9, seed=6)
    g = torch.Generator().manual_seed(1)
    per_head = torch.rand(B, H, 6, 9, generator=g) > 0.3
    per_head[0, 1, 2] = False  # one fully masked row
    per_head = per_head.to(DEV)
    _compare(q, k, v, per_head, _edits(9, "all", True), **SMALL)
    shared = _padded_mask(6, 9, 2, "additive")[:1]  # [1, 1, Tq, Tk]: broadcast over the batch
    _compare(q, k, v, shared, _edits(9, "all", False), **SMALL)


def test_strided_query_as_transformers_passes_it_and_mha():
    """transformers' query is a transposed view of [B, Tq, H, D]; no GQA here (Hkv == H)."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(B, 7, H, D, generator=g).to(DEV).transpose(1, 2)
    k, v = (torch.randn(B, H, 7, D, generator=g).to(DEV) for _ in range(2))
    assert not q.is_contiguous()
    _compare(q, k, v, None, _edits(7, "all", True), **SMALL)


@pytest.mark.parametrize("blocks", [{"block_m": 16, "block_n": 16}, {}], ids=["16x16", "default"])
def test_block_sizes_agree(blocks):
    q, k, v = _case(13, 40, seed=9)
    _compare(q, k, v, _padded_mask(13, 40, 5, "bool"), _edits(40, "all", True), **blocks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq,tk", [(9, 9), (1, 23)], ids=["prefill", "decode"])
def test_half_inputs_compute_in_fp32(dtype, tq, tk):
    q, k, v = _case(tq, tk, seed=4, dtype=dtype)
    mask = _padded_mask(tq, tk, 2, "additive", dtype=dtype)  # transformers' float masks have the query dtype
    _compare(q, k, v, mask, _edits(tk, "all", True), record_rows="last", atol=1e-2, rows_atol=1e-5, **SMALL)


def test_dispatch_picks_the_backend(monkeypatch, caplog):
    q, k, v = _case(3, 3)
    monkeypatch.setenv("LUCID_KERNELS", "triton")
    assert dispatch.backend_for(q) == "triton"
    out, _ = dispatch.edited_attention(q, k, v, None, D**-0.5, _edits(3, "head_scale", False))
    ref, _ = edited_attention_reference(q, k, v, None, D**-0.5, _edits(3, "head_scale", False))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="fp32 / bf16 / fp16"):  # asked for, but it cannot serve fp64
        dispatch.backend_for(q.double())
    monkeypatch.setenv("LUCID_KERNELS", "reference")
    assert dispatch.backend_for(q) == "reference"
    monkeypatch.setenv("LUCID_KERNELS", "auto")
    assert dispatch.backend_for(q) == ("triton" if CUDA else "reference")  # CPU: the interpreter is for tests
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="lucid_kernels.dispatch"):
        assert dispatch.backend_for(q.cpu()) == "reference" and dispatch.backend_for(q.cpu()) == "reference"
    assert sum("CPU tensors" in r.message for r in caplog.records) == 1  # the reason, logged once
    monkeypatch.setenv("LUCID_KERNELS", "triton")
    monkeypatch.setattr(tat, "interpreting", lambda: False)  # a process that imported triton compiled
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.backend_for(q.cpu())


def test_compiles_for_sm90_without_a_gpu():
    """The compiled (not interpreted) path at LLaVA-1.5 head size, bf16, every edit and the read-out's row
    statistics, prefill with a boolean mask and decode with an additive one: Triton's front end, the sm_90
    lowering and ptxas accept it with the default tiles, and ptxas reports no register spills (the
    interpreter checks none of that). In a fresh process: this one may hold an interpreter-mode triton."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lucid.bench.kernels", "--compile-report", "--only", "prefill-all,decode-all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["prefill-all", "decode-all"]
    for r in rows:
        assert r["shared"] > 0 and r["spill_stores"] in (0, None), r


@pytest.mark.skipif(not tat.INTERPRETED, reason="the testbed runs on CPU: needs the interpreter")
def test_generation_through_the_seam_with_triton_equals_the_reference(testbed_vlm, monkeypatch):
    """End to end: PAI (logit edits on image keys) + VHR (head scales) + the recorder, with every edited layer
    served by the fused kernel (interpreted), gives the reference path's tokens, log-probabilities and rows."""
    from mitigation import AttentionRecorder
    from mitigation.methods import parse_methods
    from testbed.world.scenes import render_scene
    from vlm import SamplingParams, build_inputs, generate

    inputs = build_inputs(testbed_vlm, [render_scene(3).image], ["Is there a red circle in the image?"])
    methods = parse_methods(["vhr:alpha=1.5,scale_free_stream=false", "pai:alpha=0.6,gamma=1"])
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LUCID_KERNELS", backend)
        rec = AttentionRecorder(layers=[2], prefill_rows="last")
        gen = generate(testbed_vlm, inputs, SamplingParams(max_new_tokens=2), methods=methods, recorder=rec)[0]
        runs[backend] = (gen.token_ids, torch.tensor(gen.token_logprobs), rec.image_attention(2))
    ref, tri = runs["reference"], runs["triton"]
    assert ref[0] == tri[0]
    torch.testing.assert_close(tri[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri[2], ref[2], atol=1e-5, rtol=1e-4)


# ---- compiled, on CUDA, at LLaVA-1.5 shapes (H = 32, D = 128, ~700 keys) -------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tq,tk", [(640, 640), (37, 700), (1, 700)], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("edit_kind", [None, "logits", "redistribute", "all"])
def test_cuda_llava15_shapes(tq, tk, dtype, edit_kind):
    q, k, v = _case(tq, tk, dtype=dtype, device="cuda", h=32, hkv=32, d=128)
    mask = _padded_mask(tq, tk, 9, "bool", device="cuda") if tq > 1 else None
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    _compare(q, k, v, mask, _edits(611, edit_kind, True, device="cuda", h=32), "last", atol=atol, rows_atol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("record_rows", ["all", (0, 100, -1)], ids=["all", "tuple"])
def test_cuda_gqa_additive_mask_and_readout(record_rows):
    q, k, v = _case(96, 96, dtype=torch.bfloat16, device="cuda", h=32, hkv=8, d=128)
    mask = _padded_mask(96, 96, 5, "additive", device="cuda", dtype=torch.bfloat16)
    _compare(q, k, v, mask, _edits(96, "all", False, device="cuda", h=32), record_rows, atol=2e-2, rows_atol=1e-4)


@pytest.mark.gpu
@cuda
def test_cuda_auto_dispatch_uses_triton_and_matches_sdpa_without_edits(monkeypatch):
    monkeypatch.setenv("LUCID_KERNELS", "auto")
    q, k, v = _case(200, 200, dtype=torch.bfloat16, device="cuda", h=32, hkv=32, d=128)
    assert dispatch.backend_for(q, k, v) == "triton"
    out, _ = dispatch.edited_attention(q, k, v, None, 128**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
