"""Training inputs are built exactly like inference inputs, and the training loop really learns."""

import numpy as np
import torch

from testbed.studies.data import IGNORE, encode_conversation, make_batch, patch_coverage
from testbed.studies.model import TinyLlavaShape, build_processor, build_tokenizer
from testbed.world.language import QA
from testbed.world.scenes import TRAIN_CONFIG, render_scene


def test_encoding_matches_processor_and_chat_template():
    shape = TinyLlavaShape()
    proc = build_processor(shape, build_tokenizer())
    qa = QA("Is there a red circle in the image?", "Yes", "exist")
    ids, labels = encode_conversation(proc, shape.grid**2, [qa])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    ref = proc(images=render_scene(0).image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    answer = proc.tokenizer(" Yes", add_special_tokens=False).input_ids + [proc.tokenizer.eos_token_id]
    assert ids == ref + answer
    assert labels == [IGNORE] * len(ref) + answer
    # the assistant turn as the chat template writes it decodes to the same text
    full = proc.apply_chat_template(messages + [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}])
    assert full.endswith("ASSISTANT: Yes</s>")


def test_patch_coverage_sums_to_one_and_sees_objects():
    s = render_scene(3)
    cov = patch_coverage(s, 96, 12)
    assert cov.shape == (144, 13)
    np.testing.assert_allclose(cov.sum(1), 1.0, atol=1e-5)
    assert (cov[:, 1:].max(0) > 0.5).sum() == len(s.categories())


def test_batches_are_right_padded_with_answer_labels():
    shape = TinyLlavaShape()
    proc = build_processor(shape, build_tokenizer())
    b = make_batch(proc, np.random.default_rng(0), TRAIN_CONFIG, 4)
    assert b.pixel_values.shape == (4, 3, 96, 96)
    lengths = b.attention_mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.labels[i] != IGNORE).sum() > 0
    assert torch.equal((b.input_ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1), torch.full((4,), 144))
