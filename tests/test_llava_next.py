"""LLaVA-NeXT checkpoints load and generate through the same code; the layout maps the base view."""

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from testbed.model import CHAT_TEMPLATE, IMAGE, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    out = tmp_path_factory.mktemp("tiny-llava-next")
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=pinpoints,
        image_mean=[0, 0, 0],
        image_std=[1, 1, 1],
    )
    LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return out


def test_llava_next_loads_generates_and_maps_base_view(next_dir):
    from vlm import SamplingParams, build_inputs, generate, load_vlm

    vlm = load_vlm(next_dir)
    assert vlm.kind == "llava_next" and vlm.model.config.text_config._attn_implementation == "lucid"
    a = np.zeros((60, 96, 3), np.uint8)
    a[20:30, 60:72] = 255  # a bright block centred at x=66, y=25 of the original image
    inputs = build_inputs(vlm, [Image.fromarray(a)], ["Describe the image."])
    layout = inputs.layouts[0]
    assert layout.grid == (4, 4) and layout.n_tokens == 16
    assert (inputs.input_ids == vlm.image_token_id).sum() > 16  # high-resolution tiles follow the base view
    base = inputs.pixel_values[0, 0].float().mean(0).numpy()  # the base view the layout describes
    ys, xs = np.nonzero(base > base.max() / 2)
    got = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    want = layout.geometry.to_processed(np.array([66.0, 25.0]))
    assert np.abs(got - want).max() < 1.0
    gen = generate(vlm, inputs, SamplingParams(max_new_tokens=3))[0]
    assert len(gen.token_ids) >= 1
