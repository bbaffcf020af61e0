"""DyVTE's exit: Lucid's own prefill layer loop against the model's forward, the exit's identity, batches
against batch size 1 (left padding, rows exiting at different layers), the FLOP count against torch's
counter, the rules' formulas on hand-built tensors, composition and refusal, and `lucid dyvte fit`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mitigation
from lucid.errors import InputError
from mitigation import AttentionRecorder, CompositionError
from mitigation.methods import exit_rules, parse_method, parse_methods
from mitigation.methods.exit_rules import attention_exit_layer, exit_scores, features, fit_static, is_safe
from mitigation.methods.registry import MethodError
from testbed.world.scenes import render_scene
from vlm import SamplingParams, build_inputs, generate
from vlm.exit import block_columns, decoder_flops, drop_positions, merged_embeddings, prefill_with_exit

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingParams(max_new_tokens=10)
# different lengths: the batch is left padded
QUESTIONS = [
    "Is there a red circle in the image?",
    "Describe the image.",
    "What color is the square?\nAnswer the question using a single word or phrase.",
]
IMAGES = [render_scene(i).image for i in range(3)]


@pytest.fixture(scope="module")
def batch(testbed_vlm):
    return build_inputs(testbed_vlm, IMAGES, QUESTIONS)


@pytest.fixture(scope="module")
def baseline(testbed_vlm, batch):
    return generate(testbed_vlm, batch, SAMPLING)


def _prefill(vlm, inputs, decide, keep_logits=1):
    """`prefill_with_exit` as `vlm.decoding.generate` runs it (the seam's scope, the positions, an empty cache)."""
    from transformers import DynamicCache

    req = mitigation.prepare(vlm, inputs, [])
    kwargs = req.model_kwargs
    pos = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=vlm.model.config)
    drop = drop_positions(kwargs["input_ids"], vlm.image_token_id)
    with mitigation.scope(request=req, n_heads=vlm.n_heads, n_layers=vlm.n_layers):
        return prefill_with_exit(vlm, dict(kwargs), pos, cache, drop, decide, keep_logits), kwargs, pos


def never(layer, h):
    return torch.zeros(h.shape[0], dtype=torch.bool)


def at(*layers):
    """Row r exits after layers[r]."""
    return lambda layer, h: torch.tensor([layer == k for k in layers])


# ------------------------------------------------------------------------------ the layer loop itself


def test_own_layer_loop_gives_the_models_logits(testbed_vlm, batch):
    (logits, trace), kwargs, pos = _prefill(testbed_vlm, batch, never, keep_logits=0)
    with torch.no_grad():
        ref = testbed_vlm.model(**kwargs, position_ids=pos).logits
    assert torch.equal(logits, ref)
    T = kwargs["input_ids"].shape[1]
    assert trace.removed_after is None and trace.tokens == (T,) * testbed_vlm.n_layers
    assert (trace.exit_layer == testbed_vlm.n_layers).all()


def test_an_exit_removes_the_positions_and_blocking_them_is_the_same(testbed_vlm, batch):
    """One row: the positions leave after layer 1; in a batch whose other row exits later, the first row's
    image columns are blocked from layer 2 until the removal. Its logits are the same either way."""
    L, n_img = testbed_vlm.n_layers, int((batch.input_ids[0] == testbed_vlm.image_token_id).sum())
    one = build_inputs(testbed_vlm, [render_scene(0).image], [QUESTIONS[0]])
    (solo, trace), kwargs, _ = _prefill(testbed_vlm, one, at(1))
    T = kwargs["input_ids"].shape[1]
    assert trace.removed_after == 1 and trace.tokens == (T, T) + (T - n_img,) * (L - 2)
    assert trace.kept.shape == (1, T - n_img)
    assert not bool(torch.isin(trace.kept, trace.drop).any())
    two = build_inputs(testbed_vlm, [render_scene(0).image, render_scene(1).image], QUESTIONS[:2])
    (both, trace2), _, _ = _prefill(testbed_vlm, two, at(1, 3))
    assert trace2.exit_layer.tolist() == [1, 3] and trace2.removed_after == 3
    torch.testing.assert_close(both[0], solo[0], rtol=0, atol=1e-4)
    (late, _), _, _ = _prefill(testbed_vlm, build_inputs(testbed_vlm, [render_scene(1).image], [QUESTIONS[1]]), at(3))
    torch.testing.assert_close(both[1], late[0], rtol=0, atol=1e-4)
    # the exit changes what the later layers compute: not a no-op
    (full, _), _, _ = _prefill(testbed_vlm, one, never)
    assert (full - solo).abs().max() > 1e-3


def test_block_columns_and_drop_positions_by_hand():
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    out = block_columns(mask, torch.tensor([[1, 2], [3, 4]]), torch.tensor([True, False]))
    assert out[0, 0, :, 1:3].sum() == 0 and out[0, 0, :, [0, 3, 4]].all() and out[1].all()
    assert mask.all()  # a copy
    ids = torch.tensor([[0, 9, 9, 1], [9, 9, 2, 3]])
    assert drop_positions(ids, 9).tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match="different numbers of image tokens"):
        drop_positions(torch.tensor([[9, 9, 1], [9, 1, 1]]), 9)


def test_decoder_flops_match_torchs_counter(tiny_vlm):
    """The analytic count of the shapes actually run against `torch.utils.flop_counter` over the same prefill
    (the vision tower and projector, counted apart, are subtracted): exit after layer 0 of 3, and no exit."""
    inputs = build_inputs(tiny_vlm, [render_scene(0).image], ["Describe the image."])
    cfg = tiny_vlm.model.config.text_config
    req = mitigation.prepare(tiny_vlm, inputs, [])
    with FlopCounterMode(display=False) as vision, sdpa_kernel(SDPBackend.MATH):
        merged_embeddings(tiny_vlm, dict(req.model_kwargs))
    for decide in (at(0), never):
        # the math backend runs attention as matmuls the counter sees (CPU's fused SDPA has no FLOP formula)
        with FlopCounterMode(display=False) as counted, sdpa_kernel(SDPBackend.MATH):
            (_, trace), _, _ = _prefill(tiny_vlm, inputs, decide)
        measured = counted.get_total_flops() - vision.get_total_flops()
        assert measured == decoder_flops(cfg, trace.tokens), (measured, trace.tokens)
    T = trace.tokens[0]
    n = int((inputs.input_ids == tiny_vlm.image_token_id).sum())
    saved = exit_rules.saved_share(cfg, T, n, 0, tiny_vlm.n_layers)
    ran = decoder_flops(cfg, (T, T - n, T - n))
    assert saved == pytest.approx(1 - ran / decoder_flops(cfg, (T,) * 3))


# ------------------------------------------------------------------------------ the method in generate


@pytest.mark.parametrize("spec", ["dyvte:rule=static,layer=5", "dyvte:rule=static,layer=99", "dyvte:tau=0.0,m=1"])
def test_an_exit_past_the_last_layer_is_the_baseline_bit_for_bit(testbed_vlm, batch, baseline, spec):
    """layer >= L - 1 (the last layer has no later layer to save) and a threshold no mass is below: no exit."""
    out = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods([spec]))
    for g, b in zip(out, baseline):
        assert g.token_ids == b.token_ids and g.token_logprobs == b.token_logprobs
        view = g.extras["dyvte"]
        assert view.exit_layer is None and view.saved == 0.0


@pytest.mark.parametrize("spec", ["dyvte:rule=static,layer=2", "dyvte:rule=attention", "dyvte", "dyvte:safe=agreement"])
def test_batch_rows_equal_batch_size_one(testbed_vlm, batch, spec):
    """Left padded rows; with the attention rule and the routers the rows exit at different layers."""
    methods = parse_methods([spec])
    out = generate(testbed_vlm, batch, SAMPLING, methods=methods)
    for i, g in enumerate(out):
        solo = generate(testbed_vlm, build_inputs(testbed_vlm, [IMAGES[i]], [QUESTIONS[i]]), SAMPLING, methods=methods)
        assert g.token_ids == solo[0].token_ids
        torch.testing.assert_close(
            torch.tensor(g.token_logprobs), torch.tensor(solo[0].token_logprobs), rtol=0, atol=1e-4
        )
        assert g.extras["dyvte"].exit_layer == solo[0].extras["dyvte"].exit_layer
        # what the row's own exit saves alone is what the solo run saved, whatever the batch saved
        assert g.extras["dyvte"].saved_alone == pytest.approx(solo[0].extras["dyvte"].saved, abs=1e-9)
        assert solo[0].extras["dyvte"].saved_alone == pytest.approx(solo[0].extras["dyvte"].saved, abs=1e-9)


def test_static_exit_saves_what_the_shapes_say(testbed_vlm, batch):
    out = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["dyvte:rule=static,layer=2"]))
    cfg = testbed_vlm.model.config.text_config
    n = int((batch.input_ids[0] == testbed_vlm.image_token_id).sum())
    T = batch.input_ids.shape[1]
    for g in out:
        rec = g.extras["dyvte"].to_record()
        assert rec["exit_layer"] == 2 and rec["removed_after"] == 2
        assert rec["tokens_per_layer"] == [T] * 3 + [T - n] * 3
        assert rec["flops_saved"] == pytest.approx(exit_rules.saved_share(cfg, T, n, 2, 6), abs=1e-4)


def test_composition_with_attention_methods_is_refused_naming_both(testbed_vlm, batch):
    """Refused when parsed (before any model is loaded) and again from the contributions at prepare."""
    for other in ("vhr", "var:sink_dims=1,tau=5.8,rho=0.1", "magnifier", "pai", "paint", "carve"):
        name = other.split(":")[0]
        with pytest.raises(CompositionError, match=rf"dyvte and {name} cannot be combined"):
            parse_methods(["dyvte:layer=2", other])
        with pytest.raises(CompositionError, match=rf"{name} cannot be combined.*logits-only"):
            parse_methods([other, "dyvte"])
    with pytest.raises(CompositionError, match="dyvte and vhr cannot be combined"):
        mitigation.prepare(testbed_vlm, batch, [parse_method("dyvte:layer=2"), parse_method("vhr")])


def test_with_vcd_the_noised_rows_follow_their_request_row(testbed_vlm, batch):
    vcd = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["vcd"]))
    never_exit = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["dyvte:layer=99", "vcd"]))
    assert [g.token_ids for g in never_exit] == [g.token_ids for g in vcd]
    both = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["dyvte:layer=2", "vcd"]))
    assert all(g.extras["dyvte"].exit_layer == 2 for g in both)


def test_refusals_are_clear(testbed_vlm, tiny_vlm, batch, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="dyvte cannot record"):
        generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["dyvte:layer=2"]), recorder=AttentionRecorder())
    monkeypatch.setenv("LUCID_CACHE", str(tmp_path))
    one = build_inputs(tiny_vlm, [render_scene(0).image], ["Describe the image."])
    for spec in ("dyvte", "dyvte:rule=static", "dyvte:rule=attention,safe=agreement"):
        with pytest.raises(MethodError, match="run `lucid dyvte fit --model"):
            generate(tiny_vlm, one, SAMPLING, methods=parse_methods([spec]))
    generate(tiny_vlm, one, SAMPLING, methods=parse_methods(["dyvte:layer=1"]))  # explicit: needs nothing


# ------------------------------------------------------------------------------ the rules' formulas


def test_exit_scores_and_labels_by_hand():
    answer = torch.tensor([[0, 1], [1, 1]])
    valid = torch.tensor([[True, True], [True, False]])
    full = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [9.0, 0.0]]])
    exited = torch.tensor([[[5.0, 0.0], [0.0, 4.0]], [[5.0, 0.0], [9.0, 0.0]]])
    agreement, ratio = exit_scores(full, exited, answer, valid)
    assert agreement.tolist() == [1.0, 0.0]  # row 1's second position is not its answer
    ce = torch.nn.functional.cross_entropy
    r0 = (ce(exited[0], answer[0], reduction="sum") / ce(full[0], answer[0], reduction="sum")).item()
    assert ratio[0].item() == pytest.approx(r0) and ratio[0] > 1.03  # 0.0067 -> 0.018: unchanged argmax, 2.7x loss
    assert is_safe(agreement, ratio, "paper").tolist() == [False, False]
    assert is_safe(agreement, ratio, "agreement").tolist() == [True, False]
    assert is_safe(torch.tensor([1.0]), torch.tensor([1.02])).tolist() == [True]
    with pytest.raises(ValueError, match="label must be one of"):
        is_safe(agreement, ratio, "nope")


def test_static_and_attention_rules_by_hand():
    safe = torch.tensor([[False, True, True], [False, False, True], [True, True, True]])
    assert fit_static(safe, 0.6) == 1 and fit_static(safe, 1.0) == 2
    assert fit_static(torch.zeros(2, 3, dtype=torch.bool), 0.5) == 3  # never
    mass = torch.tensor([[0.9, 0.2, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1], [0.9, 0.9, 0.9, 0.1]])
    assert attention_exit_layer(mass, 0.5, 1, 0).tolist() == [1, 0, 3]
    assert attention_exit_layer(mass, 0.5, 2, 0).tolist() == [2, 3, 3]  # two in a row; the last layer: never
    assert attention_exit_layer(mass, 0.5, 1, 2).tolist() == [2, 2, 3]


def test_router_features_and_decision_by_hand():
    h = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 4, 2)
    f = features(h, torch.tensor([1, 2]), torch.tensor([3, 3]))
    # the question runs from its start up to, not including, the last prompt token; then the last token itself
    assert f.tolist() == [[3.0, 4.0, 6.0, 7.0], [12.0, 13.0, 14.0, 15.0]]
    routers = exit_rules.Routers(d=2, n_layers=3, hidden=4)
    logits = routers(1, f)
    assert logits.shape == (2, 2)
    assert routers.exits(1, f).tolist() == (logits[:, 1] > logits[:, 0]).tolist()


def test_folder_samples_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no questions.jsonl"):
        exit_rules.folder_samples(tmp_path)
    (tmp_path / "questions.jsonl").write_text('{"image": "a.png", "question": "Describe the image."}\n{"img": 1}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:2: expected"):
        exit_rules.folder_samples(tmp_path)


# ------------------------------------------------------------------------------ the command


def lucid(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lucid.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_dyvte_fit_writes_where_dyvte_finds_it(tiny_random_dir, tmp_path):
    """`lucid dyvte fit` on a random checkpoint (a few samples, a small router) into Lucid's cache; then
    `lucid ask --method dyvte` finds it and reports the exit."""
    env = {"LUCID_CACHE": str(tmp_path / "cache")}
    image = ROOT / "testbed" / "examples" / "scene.png"
    ask = ("ask", str(image), "Describe the image.", "--model", str(tiny_random_dir), "--method", "dyvte", "--json")
    before = lucid(*ask, env_extra=env)
    assert before.returncode != 0 and "lucid dyvte fit" in before.stderr
    fit = lucid(
        "dyvte",
        "fit",
        "--model",
        str(tiny_random_dir),
        "--n",
        "8",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--json",
        env_extra=env,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    payload = json.loads(fit.stdout)
    assert [c["label"] for c in payload["calibrations"]] == list(exit_rules.LABELS)
    assert Path(payload["saved"]).is_relative_to(tmp_path / "cache")
    for c in payload["calibrations"]:
        assert len(c["safe_by_layer"]) == 2 and 0 <= c["static_layer"] <= 2
    after = lucid(*ask, env_extra=env)
    assert after.returncode == 0, after.stderr[-3000:]
    view = json.loads(after.stdout)["extras"]["dyvte"]
    assert view["rule"] == "router" and view["full_prefill_flops"] > 0
    bad = lucid("dyvte", "fit", "--model", str(tiny_random_dir), "--data", str(tmp_path), env_extra=env)
    assert bad.returncode == 2 and "no questions.jsonl" in bad.stderr
