"""The seam: the "lucid" attention function equals sdpa when idle, applies plans exactly, records
exactly what eager attention computes, and keeps concurrent requests apart."""

import threading

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import mitigation
from lucid_kernels import AttentionEdit, edited_attention_reference
from mitigation import AttentionRecorder, LayerEdit, Plan
from testbed.world.scenes import render_scene
from vlm import build_inputs

QUESTIONS = ["Is there a red circle in the image?", "Describe the image.", "How many squares are there?"]


@pytest.fixture(scope="module")
def batch(tiny_vlm):
    images = [render_scene(i).image for i in range(3)]
    inputs = build_inputs(tiny_vlm, images, QUESTIONS)
    assert (inputs.attention_mask == 0).any(), "the batch must be left padded"
    return inputs


@pytest.fixture(scope="module")
def reference_models(tiny_random_dir):
    sdpa = LlavaForConditionalGeneration.from_pretrained(tiny_random_dir, attn_implementation="sdpa").eval()
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_random_dir, attn_implementation="eager").eval()
    return sdpa, eager


def _prefill_and_decode(model, inputs, steps=3, scope_kwargs=None):
    """Logits of the prefill (valid positions) and of `steps` greedy KV-cache decode steps."""
    from transformers import DynamicCache

    mask = inputs.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    ctx = mitigation.scope(**scope_kwargs) if scope_kwargs else torch.no_grad()
    outs = []
    with torch.no_grad(), ctx:
        out = model(**inputs.model_kwargs(), position_ids=pos, past_key_values=cache, use_cache=True)
        outs.append(out.logits[mask.bool()])
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            outs.append(out.logits[:, -1])
    return outs


def test_attention_implementation_is_per_backbone(tiny_vlm):
    cfg = tiny_vlm.model.config
    assert cfg.text_config._attn_implementation == "lucid"
    assert cfg.vision_config._attn_implementation == "sdpa"


def test_no_plan_equals_sdpa_with_padding_and_cache(tiny_vlm, batch, reference_models):
    sdpa, _ = reference_models
    ours = _prefill_and_decode(tiny_vlm.model, batch)
    ref = _prefill_and_decode(sdpa, batch)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_plan_and_recorder_do_not_change_outputs(tiny_vlm, batch, reference_models):
    sdpa, _ = reference_models
    image_mask = batch.input_ids == tiny_vlm.image_token_id
    kw = dict(
        plan=Plan(),
        recorder=AttentionRecorder(layers=[0, 2]),
        image_mask=image_mask,
        n_heads=tiny_vlm.n_heads,
        n_layers=tiny_vlm.n_layers,
    )
    ours = _prefill_and_decode(tiny_vlm.model, batch, scope_kwargs=kw)
    ref = _prefill_and_decode(sdpa, batch)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mask_function_is_registered_padding_is_respected(tiny_vlm, batch):
    """Without the mask function the padding mask is silently dropped: a padded row would then
    differ from the same request run alone."""
    padded_row = int((batch.attention_mask == 0).any(1).nonzero()[0])
    with torch.no_grad():
        full = tiny_vlm.model(**batch.model_kwargs(), position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0))
        alone = build_inputs(tiny_vlm, [render_scene(padded_row).image], [QUESTIONS[padded_row]])
        solo = tiny_vlm.model(**alone.model_kwargs())
    n = alone.input_ids.shape[1]
    torch.testing.assert_close(full.logits[padded_row, -n:], solo.logits[0], rtol=1e-4, atol=1e-4)


def test_identity_edit_through_reference_equals_sdpa(tiny_vlm, batch, reference_models):
    """A plan whose edits are zero goes through the edited-attention reference in every layer and
    must still match sdpa (to fp32 rounding)."""
    sdpa, _ = reference_models
    plan = Plan({i: LayerEdit(abs_scale=0.0, bias=0.0, head_scale=1.0) for i in range(tiny_vlm.n_layers)})
    kw = dict(
        plan=plan,
        image_mask=batch.input_ids == tiny_vlm.image_token_id,
        n_heads=tiny_vlm.n_heads,
        n_layers=tiny_vlm.n_layers,
    )
    ours = _prefill_and_decode(tiny_vlm.model, batch, scope_kwargs=kw)
    ref = _prefill_and_decode(sdpa, batch)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_recorder_matches_eager_attention(tiny_vlm, batch, reference_models):
    _, eager = reference_models
    image_mask = batch.input_ids == tiny_vlm.image_token_id
    rec = AttentionRecorder(layers=None, prefill_rows="all")
    with torch.no_grad(), mitigation.scope(recorder=rec, image_mask=image_mask):
        tiny_vlm.model(**batch.model_kwargs(), position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        out = eager(
            **batch.model_kwargs(),
            position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
            output_attentions=True,
        )
    valid = batch.attention_mask.bool()
    for layer in range(tiny_vlm.n_layers):
        ours = rec.image_attention(layer)  # [B, H, T, N]
        for b in range(batch.batch_size):
            pos = image_mask[b].nonzero().flatten()
            want = out.attentions[layer][b][:, :, pos]  # [H, T, N]
            torch.testing.assert_close(ours[b][:, valid[b]], want[:, valid[b]], rtol=1e-4, atol=1e-5)


def test_recorder_decode_rows_match_eager(tiny_vlm, reference_models):
    """Each decode step records one row per layer, equal to eager attention over the KV cache."""
    _, eager = reference_models
    inputs = build_inputs(tiny_vlm, [render_scene(5).image], ["Describe the image."])
    rec = AttentionRecorder(layers=[1], prefill_rows="last")
    from vlm import SamplingParams, generate

    gen = generate(tiny_vlm, inputs, SamplingParams(max_new_tokens=4), recorder=rec)[0]
    rows = rec.image_attention(1)  # [1, H, 1 + steps, N]
    assert rows.shape[2] == 1 + len(gen.timings.decode_s)
    ids = torch.cat([inputs.input_ids, torch.tensor([gen.token_ids[: rows.shape[2] - 1]])], dim=1)
    with torch.no_grad():
        out = eager(input_ids=ids, pixel_values=inputs.pixel_values, output_attentions=True)
    pos = (inputs.input_ids[0] == tiny_vlm.image_token_id).nonzero().flatten()
    t0 = inputs.input_ids.shape[1] - 1
    want = out.attentions[1][0][:, t0 : t0 + rows.shape[2]][:, :, pos]
    torch.testing.assert_close(rows[0], want, rtol=1e-4, atol=1e-5)


def test_hidden_capture_matches_output_hidden_states(tiny_vlm, batch, reference_models):
    sdpa, _ = reference_models
    L = tiny_vlm.n_layers
    rec = AttentionRecorder(layers=[], hidden_layers=range(L + 1))
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), mitigation.scope(recorder=rec, image_mask=batch.input_ids == tiny_vlm.image_token_id):
        tiny_vlm.model(**batch.model_kwargs(), position_ids=pos)
    with torch.no_grad():
        ref = sdpa(**batch.model_kwargs(), position_ids=pos, output_hidden_states=True).hidden_states
    assert len(ref) == L + 1
    for i in range(L + 1):
        torch.testing.assert_close(rec.hidden_states(i), ref[i], rtol=1e-5, atol=1e-5)


def test_edit_formula_by_hand():
    """z = [1, -2]; key 1 is in the set; abs_scale 0.5 and bias 0.25: z' = [1, -2 + 1 + 0.25]."""
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[1.0], [-2.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    edit = AttentionEdit(
        key_mask=torch.tensor([[False, True]]),
        rows="all",
        abs_scale=torch.tensor([0.5]),
        bias=torch.tensor([0.25]),
        head_scale=torch.tensor([2.0]),
    )
    out, rows = edited_attention_reference(q, k, v, None, 1.0, edit, record_index=torch.tensor([[1]]))
    z = np.array([1.0, -0.75])
    p = np.exp(z) / np.exp(z).sum()
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(2.0 * (10 * p[0] + 20 * p[1]), rel=1e-6)
    assert rows.item() == pytest.approx(p[1], rel=1e-6)


def test_edit_rows_last_only_touches_last_query():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    key_mask = torch.tensor([[True, True, False, False]])
    base, _ = edited_attention_reference(q, k, v, None, 8**-0.5)
    edit = AttentionEdit(key_mask=key_mask, rows="last", abs_scale=torch.tensor([1.0, 1.0]))
    out, _ = edited_attention_reference(q, k, v, None, 8**-0.5, edit)
    torch.testing.assert_close(out[:, :3], base[:, :3])
    assert not torch.allclose(out[:, 3], base[:, 3])


def test_plan_validation_errors(tiny_vlm, batch):
    image_mask = batch.input_ids == tiny_vlm.image_token_id
    with pytest.raises(ValueError, match="text backbone has 3 layers"):
        with mitigation.scope(Plan({7: LayerEdit(bias=1.0)}), image_mask=image_mask, n_heads=4, n_layers=3):
            pass
    with pytest.raises(ValueError, match="query heads"):
        with mitigation.scope(Plan({0: LayerEdit(bias=(1.0, 2.0))}), image_mask=image_mask, n_heads=4, n_layers=3):
            pass
    with pytest.raises(ValueError, match="unknown key set"):
        with mitigation.scope(
            Plan({0: LayerEdit(key_set="local", bias=1.0)}), image_mask=image_mask, n_heads=4, n_layers=3
        ):
            pass
    assert mitigation.current() is None


def test_concurrent_threads_see_only_their_own_plan(tiny_vlm):
    from vlm import SamplingParams, generate

    inputs = build_inputs(tiny_vlm, [render_scene(11).image], ["Describe the image."])
    strong = Plan({i: LayerEdit(bias=-30.0, head_scale=0.0) for i in range(tiny_vlm.n_layers)})
    sampling = SamplingParams(max_new_tokens=6)

    def run(plan):
        rec = AttentionRecorder(layers=[0])
        gen = generate(tiny_vlm, inputs, sampling, plan=plan, recorder=rec)[0]
        return gen.token_ids, rec.image_attention(0).clone()

    solo = {name: run(p) for name, p in (("base", None), ("strong", strong))}
    assert solo["base"][0] != solo["strong"][0], "the test plan must change the answer"
    results: dict[str, list] = {"base": [], "strong": []}
    barrier = threading.Barrier(2)

    def worker(name, plan):
        barrier.wait()
        for _ in range(4):
            results[name].append(run(plan))

    threads = [threading.Thread(target=worker, args=(n, p)) for n, p in (("base", None), ("strong", strong))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ("base", "strong"):
        assert len(results[name]) == 4
        for tokens, rows in results[name]:
            assert tokens == solo[name][0]
            torch.testing.assert_close(rows, solo[name][1])


def test_recorder_explicit_prompt_rows(tiny_vlm, batch):
    """Recording chosen prompt positions gives exactly those rows of the 'all' recording."""
    image_mask = batch.input_ids == tiny_vlm.image_token_id
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    T = batch.input_ids.shape[1]
    rows = (T - 5, T - 3, T - 1)
    full, some = AttentionRecorder(layers=[2], prefill_rows="all"), AttentionRecorder(layers=[2], prefill_rows=rows)
    for rec in (full, some):
        with torch.no_grad(), mitigation.scope(recorder=rec, image_mask=image_mask):
            tiny_vlm.model(**batch.model_kwargs(), position_ids=pos)
    torch.testing.assert_close(some.image_attention(2), full.image_attention(2)[:, :, list(rows)])
    with pytest.raises(ValueError, match="prefill_rows"):
        AttentionRecorder(prefill_rows="first")
