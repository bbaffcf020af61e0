"""VCD's pieces on hand-built tensors: the contrast and its plausibility cut, the diffusion schedule and the
seeded noise; and sampled VCD rows equal batch size 1."""

import math

import pytest
import torch

from mitigation.methods import parse_method, parse_methods
from mitigation.methods.vcd import contrast
from mitigation.seam.request import SecondStream, noise_schedule, noised_pixels
from testbed.world.scenes import render_scene
from vlm import SamplingParams, build_inputs, generate


def test_contrast_formula_and_cut_by_hand():
    main = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    noised = torch.tensor([[1.0, 2.0, 0.0, 0.5]])
    out = contrast(alpha=1.0, beta=0.3)(main, noised)
    # p >= 0.3 max p  <=>  l >= log 0.3 + 2 = 0.796: tokens 0 and 1 kept
    assert out[0, 2] == -math.inf and out[0, 3] == -math.inf
    assert out[0, 0].item() == pytest.approx(2 * 2.0 - 1.0) and out[0, 1].item() == pytest.approx(2 * 1.0 - 2.0)
    # the cut on logits is the cut on probabilities (softmax is shift-invariant)
    p = torch.softmax(main, -1)
    assert torch.equal(torch.isinf(out), p < 0.3 * p.max(-1, keepdim=True).values)
    # alpha = 0, beta = 0: the logits themselves
    assert torch.equal(contrast(0.0, 0.0)(main, noised), main)
    assert torch.equal(contrast(0.0, 0.0)(main, None), main)  # alpha = 0 runs no stream
    with pytest.raises(RuntimeError, match="noised-image stream"):
        contrast(1.0, 0.1)(main, None)


def test_diffusion_schedule_by_hand():
    a = noise_schedule()
    assert a.shape == (1000,)
    beta0 = 1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5
    assert a[0].item() == pytest.approx(math.sqrt(1 - beta0), rel=1e-12)
    assert bool((a[1:] < a[:-1]).all())
    # the cumulative product recomputed in plain Python: at step 500 signal 0.86 / noise 0.51, at 999 0.29 / 0.96
    prod = 1.0
    for t in range(1000):
        prod *= 1 - (1 / (1 + math.exp(-(-6 + 12 * t / 999))) * (5e-3 - 1e-5) + 1e-5)
        if t in (500, 999):
            assert a[t].item() == pytest.approx(math.sqrt(prod), rel=1e-9)
    assert a[500].item() == pytest.approx(0.863, abs=1e-3) and a[999].item() == pytest.approx(0.285, abs=1e-3)


def test_noised_pixels_statistics_and_seed():
    x = torch.full((2, 3, 64, 64), 0.7)
    y = noised_pixels(x, 500, seed=3)
    a = noise_schedule()[500].item()
    eps = (y.double() - a * 0.7) / math.sqrt(1 - a * a)
    assert abs(eps.mean().item()) < 0.03 and abs(eps.std().item() - 1) < 0.03
    assert torch.equal(y[0], y[1])  # every row the same draw: rows independent of their neighbours
    assert torch.equal(y, noised_pixels(x, 500, seed=3)) and not torch.equal(y, noised_pixels(x, 500, seed=4))
    assert torch.equal(noised_pixels(x, 0, 0), noised_pixels(x, 0, 0))
    with pytest.raises(ValueError, match="noise_step"):
        SecondStream("noise", until="end", noise_step=1000)


def test_presets_and_streams_are_shared_by_identity():
    assert parse_method("vcd").beta == 0.2 and parse_method("vcd:preset=paper").beta == 0.1
    a, b = parse_method("vcd").second_stream(), parse_method("vcd:noise_step=999").second_stream()
    assert a.identity != b.identity and a.kind == b.kind == "noise"
    with pytest.raises(Exception, match="noise_step"):
        parse_method("vcd:noise_step=1000")


def test_sampled_vcd_rows_equal_batch_size_one(testbed_vlm):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    questions = ["Describe the image.", "Is there a red circle in the image?"]
    images = [render_scene(i).image for i in range(2)]
    methods = parse_methods(["vcd"])
    gens = generate(testbed_vlm, build_inputs(testbed_vlm, images, questions), sampling, methods=methods)
    for i, g in enumerate(gens):
        solo = generate(testbed_vlm, build_inputs(testbed_vlm, [images[i]], [questions[i]]), sampling, methods=methods)
        assert g.token_ids == solo[0].token_ids
