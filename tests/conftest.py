"""Shared fixtures: a tiny random LLaVA saved as a real llava-hf directory, and the embedded testbed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# Property-based tests: CI replays a fixed example sequence (a red CI run then reproduces exactly);
# local runs explore new examples each time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


#: The tiny random LLaVA's shape (2 vision layers, 3 text layers, GQA); tests override fields of it.
TINY_SHAPE = dict(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    vision_mlp=64,
    text_hidden=64,
    text_layers=3,
    text_heads=4,
    text_kv_heads=2,
    text_mlp=128,
)


@pytest.fixture(scope="session")
def tiny_shape():
    """`TinyLlavaShape(**overrides)` on top of TINY_SHAPE."""
    from testbed.studies.model import TinyLlavaShape

    return lambda **overrides: TinyLlavaShape(**{**TINY_SHAPE, **overrides})


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory, tiny_shape):
    """A randomly initialised LLaVA (2 vision layers, 3 text layers, GQA) built with the testbed's
    tokenizer/processor and saved with save_pretrained: exercises the real loading path."""
    from transformers import LlavaForConditionalGeneration

    from testbed.studies.model import build_config, build_processor, build_tokenizer

    torch.manual_seed(0)
    shape = tiny_shape()
    tok = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(shape, tok))
    # random weights give flat logits; scale the LM head so greedy decoding is decisive
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    out = tmp_path_factory.mktemp("tiny-random-llava")
    model.save_pretrained(out)
    build_processor(shape, tok).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vlm(tiny_random_dir):
    from vlm import load_vlm

    return load_vlm(tiny_random_dir)


@pytest.fixture(scope="session")
def testbed_vlm():
    from vlm import load_vlm

    return load_vlm("testbed")
