"""Methods through the real generation path on the embedded testbed model: zero strength is the baseline
bit for bit (second stream included), batch rows equal batch size 1, composition order and rejection,
VAR's per-sample state, the recorder under edits, the sink calibration cache, layer rules by depth."""

from types import SimpleNamespace

import pytest
import torch

import mitigation
from mitigation import AttentionRecorder, CompositionError
from mitigation.methods import parse_method, parse_methods
from mitigation.methods.pai import PAI
from mitigation.methods.var import VAR, load_or_calibrate
from mitigation.methods.vhr import VHR
from mitigation.seam.request import RequestContext
from testbed.world.scenes import render_scene
from vlm import SamplingParams, build_inputs, generate

QUESTIONS = ["Is there a red circle in the image?", "Describe the image.", "What color is the square?"]
SAMPLING = SamplingParams(max_new_tokens=8)
# the testbed backbone has no massive activations (see `lucid calibrate testbed`), so VAR's tests name
# sink dimensions that flag some tokens: channel 1 dominates many image tokens' hidden states
VAR_TEST = "var:sink_dims=1,tau=5.8,rho=0.1"
EFFECTIVE = ["pai", "pai:alpha=0,gamma=2", "paint", "paint:heads=uniform", "vhr", VAR_TEST, "vcd", "vcd+vhr"]


@pytest.fixture(scope="module")
def batch(testbed_vlm):
    return build_inputs(testbed_vlm, [render_scene(i).image for i in range(3)], QUESTIONS)


@pytest.fixture(scope="module")
def baseline(testbed_vlm, batch):
    return generate(testbed_vlm, batch, SAMPLING)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LUCID_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "spec",
    [
        "pai:alpha=0,gamma=1",
        "paint:alpha=0,beta=0,gamma=1",
        "paint:preset=paper,alpha=0,beta=0",
        "vhr:alpha=1",
        "vhr:alpha=1,free_stream=mean_image",
        "var:p=0,semantics=paper",
        "var:preset=paper,p=0",
        "var:p=1",
        "vcd:alpha=0,beta=0",
    ],
)
def test_zero_strength_is_the_baseline_bit_for_bit(testbed_vlm, batch, baseline, spec):
    methods = parse_methods([spec])
    gens = generate(testbed_vlm, batch, SAMPLING, methods=methods)
    for g, b in zip(gens, baseline):
        assert g.token_ids == b.token_ids
        assert g.token_logprobs == b.token_logprobs  # exact: the seam leaves every layer on sdpa
    if spec.startswith("vhr"):  # the image-free stream did run, in the same batch
        assert mitigation.prepare(testbed_vlm, batch, methods).rows == 2 * batch.batch_size


@pytest.mark.parametrize(
    "spec",
    [
        "pai:alpha=1e-6,gamma=1.000001,cutoff=0",
        "paint:alpha=1e-6,beta=1e-6,gamma=1",
        "vhr:alpha=1.000001",
        "var:semantics=paper,p=1e-6,sink_dims=1,tau=5.8,rho=0.1,require_image_sink=false",
        "vcd:alpha=1e-6,beta=0",  # the noised stream runs (its images change the batch: not bit for bit)
    ],
)
def test_near_zero_strength_is_continuous(testbed_vlm, batch, baseline, spec):
    """The same machinery at a tiny strength (edits applied, second streams run) stays at the baseline
    (guidance without its plausibility cut: the cut itself is a step at gamma != 1, as in PAI)."""
    gens = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods([spec]))
    for g, b in zip(gens, baseline):
        assert g.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(g.token_logprobs), torch.tensor(b.token_logprobs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec", EFFECTIVE)
def test_batch_rows_equal_batch_size_one(testbed_vlm, batch, baseline, spec):
    methods = parse_methods(spec.split("+"))
    gens = generate(testbed_vlm, batch, SAMPLING, methods=methods)
    assert any(g.token_logprobs != b.token_logprobs for g, b in zip(gens, baseline)), "the method must act"
    for i, g in enumerate(gens):
        solo = generate(
            testbed_vlm, build_inputs(testbed_vlm, [render_scene(i).image], [QUESTIONS[i]]), SAMPLING, methods=methods
        )[0]
        assert g.token_ids == solo.token_ids
        torch.testing.assert_close(torch.tensor(g.token_logprobs), torch.tensor(solo.token_logprobs), rtol=0, atol=1e-4)


def _prefill_sinks(vlm, inputs, method):
    req = mitigation.prepare(vlm, inputs, [method])
    with torch.no_grad(), mitigation.scope(request=req, n_heads=vlm.n_heads, n_layers=vlm.n_layers):
        vlm.model(**req.model_kwargs, position_ids=(req.model_kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    return {layer: s.clone() for layer, s in req.hooks[0].sinks.items()}


def test_var_state_is_reset_per_sample(testbed_vlm):
    """The official code keeps the first sample's sinks for every later one; here two different samples
    in sequence give exactly what each gives alone (and their sinks do differ)."""
    method = parse_methods([VAR_TEST])[0]
    a = build_inputs(testbed_vlm, [render_scene(0).image], ["Describe the image."])
    b = build_inputs(testbed_vlm, [render_scene(3).image], ["Describe the image."])
    sinks_a, sinks_b = _prefill_sinks(testbed_vlm, a, method), _prefill_sinks(testbed_vlm, b, method)
    assert any(not torch.equal(sinks_a[k], sinks_b[k]) for k in sinks_a), "the two samples must have different sinks"
    alone_b = generate(testbed_vlm, b, SAMPLING, methods=[method])[0]
    alone_a = generate(testbed_vlm, a, SAMPLING, methods=[method])[0]
    seq = [generate(testbed_vlm, x, SAMPLING, methods=[method])[0] for x in (a, b, a)]
    assert [g.token_logprobs for g in seq] == [alone_a.token_logprobs, alone_b.token_logprobs, alone_a.token_logprobs]
    assert _prefill_sinks(testbed_vlm, a, method).keys() == sinks_a.keys()


def test_composition_order_follows_the_list(testbed_vlm, batch):
    pai, paint = parse_methods(["pai:alpha=0.3", "paint:heads=uniform,gamma=1"])
    for methods, first in (((pai, paint), "image"), ((paint, pai), "paint.local")):
        req = mitigation.prepare(testbed_vlm, batch, methods)
        assert [e.key_set for e in req.plan.edits[2]][0] == first
        assert {e.key_set for e in req.plan.edits[2]} == {"image", "paint.local", "paint.summary"}
    # a method at zero strength composes as the identity (the second stream is shared)
    with_vhr = generate(
        testbed_vlm, batch, SAMPLING, methods=parse_methods(["vhr:alpha=1,scale_free_stream=false", "pai"])
    )
    alone = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(["pai"]))
    assert [g.token_logprobs for g in with_vhr] == [g.token_logprobs for g in alone]
    # everything at once runs, one request
    every = parse_methods([VAR_TEST, "vhr:scale_free_stream=false", "paint:gamma=1", "pai"])
    gens = generate(testbed_vlm, batch, SAMPLING, methods=every)
    assert len(gens) == batch.batch_size and all(g.token_ids for g in gens)


def test_different_streams_get_their_own_blocks(testbed_vlm, batch):
    """vcd's noised stream, vhr's image-free one and pai's mean-image one are separate blocks of rows: each
    method reads its own (vhr's heads and vcd's answers are those it gets alone), and the prefill-only
    block is dropped after the first step."""
    B = batch.batch_size
    both = mitigation.prepare(testbed_vlm, batch, parse_methods(["vhr", "vcd"]))
    assert [s.kind for s in both.streams] == ["noise", "strip"]  # the block living to the end comes first
    assert both.rows == 3 * B
    free = both.model_kwargs["input_ids"][2 * B :]
    assert not (free == testbed_vlm.image_token_id).any() and torch.equal(
        both.model_kwargs["input_ids"][B : 2 * B], batch.input_ids
    )
    gens = {
        key: generate(testbed_vlm, batch, SAMPLING, methods=parse_methods(key.split("+")))
        for key in ("vcd", "vhr:alpha=1", "vhr:alpha=1+vcd", "vcd+vhr:alpha=1")
    }
    for key in ("vhr:alpha=1+vcd", "vcd+vhr:alpha=1"):  # vhr at zero strength: its block runs, changes nothing
        assert [g.token_ids for g in gens[key]] == [g.token_ids for g in gens["vcd"]]
        for g, a in zip(gens[key], gens["vcd"]):
            got, want = torch.tensor(g.token_logprobs), torch.tensor(a.token_logprobs)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    def heads(methods):
        req = mitigation.prepare(testbed_vlm, batch, parse_methods(methods))
        with torch.no_grad(), mitigation.scope(request=req, n_heads=testbed_vlm.n_heads, n_layers=testbed_vlm.n_layers):
            mask = req.model_kwargs["attention_mask"]
            testbed_vlm.model(**req.model_kwargs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        return next(h for h in req.hooks if hasattr(h, "selected")).selected

    alone, with_vcd = heads(["vhr"]), heads(["vcd", "vhr"])
    assert alone.keys() == with_vcd.keys() and all(torch.equal(alone[k], with_vcd[k]) for k in alone)
    # three blocks: pai's mean-image guidance and vcd each read their own stream
    three = mitigation.prepare(testbed_vlm, batch, parse_methods(["pai:free_stream=mean_image", "vcd", "vhr"]))
    assert [s.kind for s in three.streams] == ["mean_image", "noise", "strip"] and three.rows == 4 * B
    assert [start for _, start in three.logits_steps] == [B, 2 * B]
    # vcd reads its own block behind pai's: with pai's guidance at a near-zero strength, vcd's answers stay
    near_zero = "pai:alpha=0,gamma=1.000001,cutoff=0,free_stream=mean_image"
    out = generate(testbed_vlm, batch, SAMPLING, methods=parse_methods([near_zero, "vcd"]))
    for g, a in zip(out, gens["vcd"]):
        assert g.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor(g.token_logprobs), torch.tensor(a.token_logprobs), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "specs, message",
    [
        (["vhr", "pai"], "vhr edits the strip stream whose logits pai reads"),
        (["pai", "pai:alpha=1"], "pai is given twice"),
        (["pai", "paint"], "pai and paint both guide by the same strip stream"),
    ],
)
def test_combinations_that_cannot_be_honoured_are_rejected(specs, message):
    """Refused when the methods are parsed (before any model is loaded) and again by the seam's prepare."""
    with pytest.raises(CompositionError, match=message):
        parse_methods(specs)
    methods = [parse_method(s) for s in specs]
    with pytest.raises(CompositionError, match=message):
        mitigation.prepare(None, None, methods)


def test_recorder_sees_the_request_rows_and_edited_probabilities(testbed_vlm, batch):
    """With a second stream the recorder still gets B rows; with PAI the recorded last prompt row puts
    more mass on the image in the edited layers (the recorded rows are the edited probabilities)."""
    recs = {}
    specs = (("base", []), ("pai", ["pai:alpha=1,gamma=1.5,first_token=true"]), ("official", ["pai:alpha=1,gamma=1"]))
    for name, spec in specs:
        rec = AttentionRecorder(layers=[0, 1, 3], prefill_rows="last")
        generate(testbed_vlm, batch, SAMPLING, recorder=rec, methods=parse_methods(spec))
        recs[name] = rec
    for layer in (0, 3):
        assert recs["pai"].image_attention(layer).shape[0] == batch.batch_size
    share = {k: r.image_attention(3)[:, :, :2].sum(-1) for k, r in recs.items()}  # [B, H, 2] image mass, 2 steps
    assert bool((share["pai"][..., 0] > share["base"][..., 0]).all())
    torch.testing.assert_close(recs["pai"].image_attention(0)[:, :, 0], recs["base"].image_attention(0)[:, :, 0])
    # the official rule (first_token=false): the first answer token's row is the plain model's in every layer;
    # the second is edited (in the first edited layer its query and keys are the plain model's, so every head
    # puts more mass on the image)
    torch.testing.assert_close(share["official"][..., 0], share["base"][..., 0])
    first = {k: r.image_attention(1)[:, :, :2].sum(-1) for k, r in recs.items()}
    torch.testing.assert_close(first["official"][..., 0], first["base"][..., 0])
    assert bool((first["official"][..., 1] > first["base"][..., 1]).all())


def test_sink_calibration_is_cached_per_weights_and_overridable(testbed_vlm, tmp_path):
    cal = load_or_calibrate(testbed_vlm, cache_dir=tmp_path)
    files = list((tmp_path / "sinks").glob("*.json"))
    assert len(files) == 1 and cal.weights_hash and 1 <= len(cal.dims) <= 4
    assert cal.hidden_size == 128 and cal.layers == (1, 2, 3)
    assert load_or_calibrate(testbed_vlm, cache_dir=tmp_path) == cal  # read back, not recomputed
    explicit = load_or_calibrate(testbed_vlm, cache_dir=tmp_path, dims=(5, 9))
    assert explicit.dims == (5, 9) and explicit.source == "explicit"
    assert load_or_calibrate(testbed_vlm, cache_dir=tmp_path).dims == (5, 9)


def _context(n_layers: int) -> RequestContext:
    """A request context for a backbone of `n_layers` (the layer rules only read its depth)."""
    vlm = SimpleNamespace(
        n_layers=n_layers,
        n_heads=4,
        model=SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=4096))),
    )
    ids = torch.zeros(1, 10, dtype=torch.long)
    image = torch.zeros(1, 10, dtype=torch.bool)
    image[0, 2:6] = True
    return RequestContext(
        vlm, None, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1, image, torch.tensor([6])
    )


def test_layer_rules_at_depth_32_and_6():
    for L, pai_layers, vhr_layers, var_layers in (
        (32, range(2, 32), [1, *range(18, 32)], range(2, 31)),
        (6, range(1, 6), [1, 3, 4, 5], range(1, 5)),
    ):
        ctx = _context(L)
        assert PAI().contribute(ctx).plan.layers() == tuple(pai_layers)
        assert sorted(VHR().contribute(ctx).hook.attention_layers) == vhr_layers
        assert sorted(VAR(sink_dims=(3,), exclude_last=True).contribute(ctx).hook.attention_layers) == list(var_layers)
        assert sorted(VAR(sink_dims=(3,)).contribute(ctx).hook.attention_layers) == list(range(var_layers.start, L))
    with pytest.raises(ValueError, match="past the text backbone's 6 layers"):
        PAI(layers=(2, 7)).contribute(_context(6))
