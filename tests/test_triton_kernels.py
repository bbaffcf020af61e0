"""The fused Triton kernel against the readable reference (`kernels.reference`), case by case.

On CPU the kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, set here before Triton is imported;
tiny shapes: it is slow). `gpu`-marked tests run the same comparisons on CUDA at LLaVA-1.5 shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

tat = pytest.importorskip("kernels.triton_attention")
if not tat.HAVE_TRITON:  # pragma: no cover
    pytest.skip("triton is not importable", allow_module_level=True)

from kernels.reference import AttentionEdit, KeyEdit, Redistribution, edited_attention_reference  # noqa: E402

B, H, HKV, D = 2, 4, 2, 16


def _case(tq: int, tk: int, seed: int = 0, dtype=torch.float32, device="cpu", h=H, hkv=HKV, d=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, tq, d, generator=g).to(device, dtype)
    k = torch.randn(B, hkv, tk, d, generator=g).to(device, dtype)
    v = torch.randn(B, hkv, tk, d, generator=g).to(device, dtype)
    return q, k, v


def _padded_mask(tq: int, tk: int, pad: int, kind: str, device="cpu"):
    """Row 1 of the batch is left-padded by `pad` keys (its first `pad` queries see nothing in prefill)."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    allowed = (torch.arange(tk, device=device)[None, :] <= q_pos)[None, None].repeat(B, 1, 1, 1)
    allowed[1, :, :, :pad] = False
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _edits(tk0: int, kind: str, per_row: bool, device="cpu", h=H):
    g = torch.Generator().manual_seed(7)
    image = torch.zeros(B, tk0, dtype=torch.bool)
    image[:, 2 : tk0 // 2] = True
    local = torch.zeros(B, tk0, dtype=torch.bool)
    local[:, 3:6] = True
    shape = (B, h) if per_row else (h,)

    def coef():
        return (torch.rand(shape, generator=g) * 0.8).to(device)

    image, local = image.to(device), local.to(device)
    if kind == "logits":
        return AttentionEdit(key_mask=image, rows="last", abs_scale=coef(), bias=coef() - 0.4,
                             keys=(KeyEdit(local, "all", coef(), None),))  # fmt: skip
    if kind == "redistribute":
        sink = torch.zeros(B, tk0, dtype=torch.bool, device=device)
        sink[:, 0] = True
        sink[:, 4] = True
        target = image & ~sink
        return AttentionEdit(redistribute=Redistribution(sink, target, image, coef() + 0.2, 0.05, 0.1,
                                                         torch.tensor([2, 3], device=device)))  # fmt: skip
    if kind == "head_scale":
        return AttentionEdit(head_scale=coef() + 0.6)
    if kind == "all":
        a, r, s = _edits(tk0, "logits", per_row, device, h), _edits(tk0, "redistribute", per_row, device, h), coef()
        return AttentionEdit(a.key_mask, a.rows, a.abs_scale, a.bias, s + 0.6, a.keys, r.redistribute)
    return None


def _compare(q, k, v, mask, edit, record_rows="all", atol=2e-5, n_rec=5):
    tk = k.shape[2]
    rec = torch.stack([torch.arange(n_rec) * 2 % tk, torch.arange(n_rec) % tk]).to(q.device)
    rec[1, -1] = -1  # padding index, read as 0
    scale = q.shape[-1] ** -0.5
    ref_o, ref_r = edited_attention_reference(q, k, v, mask, scale, edit, rec, record_rows)
    # small blocks on CPU so that every case streams several key blocks (online-softmax rescaling)
    blocks = {} if q.is_cuda else {"block_m": 8, "block_n": 8}
    out, rows = tat.edited_attention_triton(q, k, v, mask, scale, edit, rec, record_rows, **blocks)
    assert out.dtype == q.dtype and out.shape == ref_o.shape
    torch.testing.assert_close(out.float(), ref_o.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(rows, ref_r, atol=atol, rtol=atol)


@pytest.mark.parametrize("edit_kind", [None, "logits", "redistribute", "head_scale", "all"])
@pytest.mark.parametrize("per_row", [False, True], ids=["H", "BH"])
def test_prefill_causal_matches_reference(edit_kind, per_row):
    q, k, v = _case(13, 13)
    _compare(q, k, v, None, _edits(13, edit_kind, per_row))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("edit_kind", [None, "all"])
def test_left_padded_prefill_matches_reference(mask_kind, edit_kind):
    q, k, v = _case(11, 11, seed=1)
    _compare(q, k, v, _padded_mask(11, 11, 3, mask_kind), _edits(11, edit_kind, True), record_rows=(0, 4, 10))


@pytest.mark.parametrize("edit_kind", [None, "logits", "redistribute", "all"])
def test_decode_with_cache_matches_reference(edit_kind):
    """One query row over 37 cached keys (the edits' key sets cover the 30-token prompt only)."""
    q, k, v = _case(1, 37, seed=2)
    _compare(q, k, v, _padded_mask(1, 37, 4, "bool"), _edits(30, edit_kind, True), record_rows="last")


def test_prefill_with_cache_offset_and_last_row_readout():
    q, k, v = _case(5, 29, seed=3)
    _compare(q, k, v, None, _edits(29, "all", False), record_rows="last")


def test_bf16_inputs_compute_in_fp32():
    q, k, v = _case(9, 9, seed=4, dtype=torch.bfloat16)
    _compare(q, k, v, None, _edits(9, "all", True), atol=2e-2)


def test_dispatch_uses_triton_when_asked(monkeypatch):
    from kernels import dispatch

    q, k, v = _case(3, 3)
    monkeypatch.setenv("LUCID_KERNELS", "triton")
    assert dispatch.backend_for(q) == "triton"
    out, _ = dispatch.edited_attention(q, k, v, None, D**-0.5)
    ref, _ = edited_attention_reference(q, k, v, None, D**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    monkeypatch.setenv("LUCID_KERNELS", "auto")
    assert dispatch.backend_for(q) == ("triton" if q.is_cuda else "reference")  # the interpreter is for tests


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tq,tk", [(600, 600), (1, 700)], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llava15_shapes(tq, tk, dtype):
    q, k, v = _case(tq, tk, dtype=dtype, device="cuda", h=32, hkv=32, d=128)
    edit = _edits(tk, "all", True, device="cuda", h=32)
    _compare(q, k, v, None, edit, atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_generation_through_the_seam_with_triton_equals_the_reference(testbed_vlm, monkeypatch):
    """End to end: PAI (logit edits on image keys) + VHR (head scales) + the recorder, with every edited layer
    served by the fused kernel (interpreted), gives the reference path's tokens, log-probabilities and rows."""
    from mitigation import AttentionRecorder
    from mitigation.methods import parse_methods
    from testbed.world import render_scene
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
