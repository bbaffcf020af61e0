"""Generation: equals transformers' own greedy generate, batches equal batch size 1, seeded sampling."""

import pytest
import torch

from testbed.world.scenes import render_scene
from vlm import SamplingParams, build_inputs, generate

QUESTIONS = [
    "Is there a red circle in the image?",
    "Describe the image.",
    "What color is the square?",
    "How many triangles are there?",
]


def _images(n, offset=0):
    return [render_scene(offset + i).image for i in range(n)]


def test_greedy_matches_transformers_generate(tiny_vlm):
    inputs = build_inputs(tiny_vlm, _images(3), QUESTIONS[:3])
    ours = generate(tiny_vlm, inputs, SamplingParams(max_new_tokens=6))
    with torch.no_grad():
        hf = tiny_vlm.model.generate(**inputs.model_kwargs(), max_new_tokens=6, do_sample=False)
    eos = tiny_vlm.processor.tokenizer.eos_token_id
    for b, g in enumerate(ours):
        ref = hf[b, inputs.input_ids.shape[1] :].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert list(g.token_ids) == ref


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_batch_size_one(testbed_vlm, temperature):
    images, questions = _images(4, offset=100), QUESTIONS
    sampling = SamplingParams(max_new_tokens=24, temperature=temperature, seed=3)
    batch = generate(testbed_vlm, build_inputs(testbed_vlm, images, questions), sampling)
    for im, q, g in zip(images, questions, batch):
        solo = generate(testbed_vlm, build_inputs(testbed_vlm, [im], [q]), sampling)[0]
        assert g.text == solo.text
        assert g.token_ids == solo.token_ids


def test_seeded_sampling_is_reproducible_and_seed_matters(tiny_vlm):
    inputs = build_inputs(tiny_vlm, _images(1), ["Describe the image."])
    runs = {
        s: [
            generate(tiny_vlm, inputs, SamplingParams(max_new_tokens=12, temperature=5.0, seed=s))[0].token_ids
            for _ in range(2)
        ]
        for s in (1, 2)
    }
    assert runs[1][0] == runs[1][1]
    assert runs[1][0] != runs[2][0]


def test_timings_and_finish_reason(tiny_vlm):
    inputs = build_inputs(tiny_vlm, _images(1), ["Describe the image."])
    g = generate(tiny_vlm, inputs, SamplingParams(max_new_tokens=5))[0]
    assert g.timings.prefill_s > 0
    assert len(g.timings.decode_s) == len(g.token_ids) - (1 if g.finish_reason == "length" else 0)
    assert g.finish_reason in ("eos", "length")
    assert g.layout.n_tokens == 16


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_ignore_eos_decodes_every_step_and_keeps_the_answer(testbed_vlm):
    inputs = build_inputs(testbed_vlm, [render_scene(2).image], ["Is there a red circle in the image?"])
    plain = generate(testbed_vlm, inputs, SamplingParams(max_new_tokens=12))[0]
    forced = generate(testbed_vlm, inputs, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert plain.finish_reason == "eos" and len(plain.timings.decode_s) < 11  # a short answer stops early
    assert len(forced.timings.decode_s) == 11  # 12 tokens: prefill + 11 decode steps
    assert forced.text == plain.text and forced.token_ids == plain.token_ids and forced.finish_reason == "eos"
