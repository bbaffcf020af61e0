"""The edited-attention contract and each method's formulas on hand-built tensors with hand-computed
values: chained logit edits on several key sets, per-row coefficients, VAR's redistribution (and its
streaming form, so no fast path needs the attention matrix), per-row head scales, VHR's head choice,
the fix's token sets and head weights, VAR's sink score, PAI's guidance, plan composition."""

import math

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from lucid_kernels import AttentionEdit, KeyEdit, Redistribution, edited_attention_reference
from mitigation import LayerEdit, Plan, compile_edits
from mitigation.methods.pai import guidance
from mitigation.methods.paint import cls_attention, head_weights, select_tokens
from mitigation.methods.var import sink_scores
from mitigation.methods.vhr import select_heads


def _one_row(z, v=None):
    """q [1,1,1,1] = 1 and keys k_j = z_j (scale 1): the logits of the single query row are z."""
    z = torch.tensor(z, dtype=torch.float32)
    q = torch.ones(1, 1, 1, 1)
    k = z.view(1, 1, -1, 1)
    v = torch.eye(len(z)).view(1, 1, len(z), len(z)) if v is None else v
    return q, k, v


def _softmax(z):
    e = np.exp(np.asarray(z) - np.max(z))
    return e / e.sum()


def test_key_edits_apply_in_order():
    """z = [1, -2, 3]; A: keys {1, 2}, abs_scale 0.5; B: key {1}, bias -1.
    A then B: [1, -2 + 1 - 1, 3 + 1.5] = [1, -2, 4.5]; B then A: [1, -3 + 1.5, 4.5] = [1, -1.5, 4.5]."""
    q, k, v = _one_row([1.0, -2.0, 3.0])
    a = KeyEdit(torch.tensor([[False, True, True]]), abs_scale=torch.tensor([0.5]))
    b = KeyEdit(torch.tensor([[False, True, False]]), bias=torch.tensor([-1.0]))
    out_ab, _ = edited_attention_reference(q, k, v, None, 1.0, AttentionEdit(keys=(a, b)))
    out_ba, _ = edited_attention_reference(q, k, v, None, 1.0, AttentionEdit(keys=(b, a)))
    np.testing.assert_allclose(out_ab[0, 0, 0].numpy(), _softmax([1, -2, 4.5]), rtol=1e-6)
    np.testing.assert_allclose(out_ba[0, 0, 0].numpy(), _softmax([1, -1.5, 4.5]), rtol=1e-6)
    # the inline first key set is the same as keys[0]
    inline = AttentionEdit(key_mask=a.key_mask, abs_scale=a.abs_scale, keys=(b,))
    torch.testing.assert_close(edited_attention_reference(q, k, v, None, 1.0, inline)[0], out_ab)


def test_per_row_coefficients_and_head_scale():
    """[B, H] coefficients: row 0 gets abs_scale 0 (unchanged), row 1 gets 1.0 (z = -2 -> 0); head
    scale [B, H] multiplies each row's output."""
    q = torch.ones(2, 1, 1, 1)
    k = torch.tensor([1.0, -2.0]).view(1, 1, 2, 1).expand(2, 1, 2, 1)
    v = torch.eye(2).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    edit = AttentionEdit(
        key_mask=torch.tensor([[False, True], [False, True]]),
        abs_scale=torch.tensor([[0.0], [1.0]]),
        head_scale=torch.tensor([[1.0], [3.0]]),
    )
    out, _ = edited_attention_reference(q, k, v, None, 1.0, edit)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), _softmax([1, -2]), rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0].numpy(), 3 * _softmax([1, 0]), rtol=1e-6)


# keys: 0 BOS (text sink), 1 image sink, 2 image, 3 image, 4 text; p = [0.4, 0.1, 0.2, 0.1, 0.2]
P = [0.4, 0.1, 0.2, 0.1, 0.2]
SINKS = torch.tensor([[True, True, False, False, False]])
IMAGE = torch.tensor([[False, True, True, True, False]])


def _redistribution(**kw):
    args = dict(
        source=SINKS,
        target=IMAGE & ~SINKS,
        gate_keys=IMAGE,
        fraction=torch.tensor([0.6]),
        min_gate_mass=0.2,
        min_target_ratio=0.5,
    )
    args.update(kw)
    return Redistribution(**args)


def test_var_redistribution_by_hand():
    """S = 0.5 (sinks), N = 0.3 (non-sink image), I = 0.4 (image): the gate passes (I >= 0.2, N/I = 0.75
    >= 0.5). f = 0.6: sinks keep 40 %: 0.16, 0.04; the budget 0.3 goes to keys 2, 3 as 2:1: 0.4, 0.2;
    text untouched. The recorded image row is the edited one."""
    q, k, v = _one_row(np.log(P).tolist())
    out, rows = edited_attention_reference(
        q, k, v, None, 1.0, AttentionEdit(redistribute=_redistribution()), record_index=torch.tensor([[1, 2, 3]])
    )
    want = [0.16, 0.04, 0.4, 0.2, 0.2]
    np.testing.assert_allclose(out[0, 0, 0].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(rows[0, 0, 0].numpy(), want[1:4], rtol=1e-5)
    # the query sits at absolute position 4: row_start 4 edits it
    edit = AttentionEdit(redistribute=_redistribution(row_start=torch.tensor([4])))
    np.testing.assert_allclose(
        edited_attention_reference(q, k, v, None, 1.0, edit)[0][0, 0, 0].numpy(), want, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_target_ratio=0.8),  # N / I = 0.75 < 0.8: not image-centric
        dict(min_gate_mass=0.5),  # I = 0.4 < 0.5
        dict(row_start=torch.tensor([5])),  # the query (absolute position 4) is before row_start
        dict(fraction=torch.tensor([0.0])),
    ],
    ids=["rho", "image-mass", "row-start", "zero"],
)
def test_var_gate_leaves_rows_alone(kw):
    q, k, v = _one_row(np.log(P).tolist())
    out, _ = edited_attention_reference(q, k, v, None, 1.0, AttentionEdit(redistribute=_redistribution(**kw)))
    np.testing.assert_allclose(out[0, 0, 0].numpy(), P, rtol=1e-5)


def test_redistribution_has_a_streaming_form():
    """o' = o + g * f * (S / N * o_T - o_S) from masses and partial outputs a flash pass accumulates:
    the fast path never needs the attention matrix."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 9, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    source = torch.rand(B, T) < 0.3
    image = torch.rand(B, T) < 0.6
    r = Redistribution(
        source, image & ~source, image, torch.tensor([0.0, 0.3, 0.6, 1.0]), 0.1, 0.2, torch.tensor([3, 5])
    )
    out, _ = edited_attention_reference(q, k, v, None, D**-0.5, AttentionEdit(redistribute=r))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    z = (q @ kk.transpose(-1, -2)) * D**-0.5
    z = z.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(z, -1)
    s_, n_, i_ = ((p * m[:, None, None].float()).sum(-1, keepdim=True) for m in (source, image & ~source, image))
    o = p @ vv
    o_s, o_t = (p * source[:, None, None].float()) @ vv, (p * (image & ~source)[:, None, None].float()) @ vv
    rows_ok = (torch.arange(T)[None] >= r.row_start[:, None])[:, None, :, None]
    g = (i_ >= 0.1) & (n_ >= 0.2 * i_) & (n_ > 0) & rows_ok
    f = r.fraction[None, :, None, None] * g
    want = o + f * (s_ / n_.clamp_min(1e-30) * o_t - o_s)
    torch.testing.assert_close(out.transpose(1, 2), want, rtol=1e-5, atol=1e-6)


def test_vhr_head_choice_by_hand():
    # no surge without the image: VHD = [1, 2, 3, 10], median 2.5 -> heads 2 and 3
    img = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    sel, vhd = select_heads(img, torch.zeros(1, 4, 1))
    assert sel.tolist() == [[False, False, True, True]]
    # head 3 surges without the image (TA = 25 > 6.25 + 10.83) and has a high VHD (5 > 2.75 + 1.48):
    # its VHD is zeroed, [1, 2, 3, 0] has median 1.5 -> heads 1 and 2
    img = torch.tensor([[[1.0], [2.0], [3.0], [0.0]]])
    free = torch.tensor([[[0.0], [0.0], [0.0], [5.0]]])
    sel, vhd = select_heads(img, free)
    assert vhd.tolist() == [[1.0, 2.0, 3.0, 0.0]] and sel.tolist() == [[False, True, True, False]]
    sel, _ = select_heads(img, free, outlier_rule=False)
    assert sel.tolist() == [[False, False, True, True]]


def test_fix_token_sets_and_head_weights_by_hand():
    # summary: IQR outliers of [1]*7 + [10] -> patch 7; local: top 25 % (2) of the first layer's scores
    # [8, 7, 6, 5, 4, 3, 2, 9] -> patches 7 and 0, minus the summary token -> patch 0
    local, summary = select_tokens(torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 9]]), torch.tensor([[1.0] * 7 + [10.0]]), 0.25)
    assert summary[0].nonzero().flatten().tolist() == [7]
    assert local[0].nonzero().flatten().tolist() == [0]
    # head weights: shares [0.1, 0.3, 0, 0] have mean 0.1 -> [1, 3, 0, 0], clipped at 2; a row that does
    # not look at the image keeps 1 per head
    w = head_weights(torch.tensor([[0.1, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), max_weight=2.0)
    assert w.tolist() == [[1.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def test_var_sink_score_by_hand():
    """x = [3, 4, 0, 0]: RMS = sqrt(25 / 4) = 2.5; phi over dims {1} = 4 / 2.5 = 1.6."""
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert sink_scores(x, (1,)).item() == pytest.approx(1.6, rel=1e-6)
    assert sink_scores(x, (0, 1)).item() == pytest.approx(1.6, rel=1e-6)
    assert sink_scores(x, (0,)).item() == pytest.approx(1.2, rel=1e-6)


def test_pai_guidance_by_hand():
    """log p = log_softmax([2, 1, -3]), log p_free = log_softmax([0, 2, 0]); gamma 2:
    2 * (log p - log p_free) + log p_free, and the token with p < 0.1 * max p is cut."""
    main, free = torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    s, u = np.log(_softmax([2, 1, -3])), np.log(_softmax([0, 2, 0]))
    want = 2 * (s - u) + u
    got = guidance(2.0, 0.1)(main, free)[0].numpy()
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)
    assert got[2] == -math.inf  # p_2 / p_0 = e^-5 < 0.1
    np.testing.assert_allclose(guidance(1.0, 0.0)(main, free)[0].numpy(), s, rtol=1e-6)  # gamma 1: log p


def test_plan_composition_keeps_order_and_multiplies_head_scales():
    a = Plan({1: LayerEdit("image", rows="last", abs_scale=0.5, head_scale=2.0)}, name="a")
    b = Plan({1: LayerEdit("local", bias=-1.0, head_scale=1.5), 2: LayerEdit(bias=1.0)}, name="b")
    ab = a.then(b)
    assert ab.name == "a+b" and ab.layers() == (1, 2) and len(ab.edits[1]) == 2
    sets = {"image": torch.tensor([[True, False]]), "local": torch.tensor([[False, True]])}
    edits = compile_edits(ab, sets, n_heads=2, n_layers=3)
    keys = edits[1].key_edits
    assert [k.key_mask.tolist() for k in keys] == [[[True, False]], [[False, True]]]
    assert keys[0].rows == "last" and keys[1].bias.tolist() == [-1.0, -1.0]
    assert edits[1].head_scale.tolist() == [3.0, 3.0]
    assert Plan.compose([a, b]) == ab


def test_cls_attention_matches_eager_vision_attention(tiny_vlm, tiny_random_dir):
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_random_dir, attn_implementation="eager").eval()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    first, summary = cls_attention(tiny_vlm, pixels)
    with torch.no_grad():
        att = eager.model.vision_tower(pixels, output_attentions=True).attentions  # 2 layers; feature layer -2
    torch.testing.assert_close(first, att[0][:, :, 0, 1:].sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summary, att[len(att) - 2][:, :, 0, 1:].sum(1), rtol=1e-5, atol=1e-6)


def test_pai_rows_option_reaches_the_plan():
    from mitigation.methods import parse_methods
    from mitigation.methods.pai import PAI

    class Ctx:
        n_layers = 6

    (paper,) = parse_methods(["pai:gamma=1"])
    (every,) = parse_methods(["pai:gamma=1,rows=all,layers=0,1"])
    assert isinstance(every, PAI)
    assert {e.rows for edits in paper.contribute(Ctx()).plan.edits.values() for e in edits} == {"last"}
    plan = every.contribute(Ctx()).plan
    assert plan.layers() == (0, 1) and {e.rows for edits in plan.edits.values() for e in edits} == {"all"}
