"""LLaVA-NeXT checkpoints load and generate through the same code; the layout maps the base view and
the high-resolution tiles."""

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

    from testbed.studies.model import CHAT_TEMPLATE, IMAGE, build_tokenizer

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


@pytest.fixture(scope="module")
def next_vlm(next_dir):
    from vlm import load_vlm

    return load_vlm(next_dir)


def _spot(w, h, x, y, r=4):
    a = np.zeros((h, w, 3), np.uint8)
    a[y - r : y + r + 1, x - r : x + r + 1] = 255
    return Image.fromarray(a)


def test_build_inputs_maps_the_tiles_of_every_row(next_vlm):
    """A left-padded batch of a wide, a tall, an odd-sized and a near-square (2x2 tiles) image: every image
    token of a row is a base cell, a tile cell or a newline, and a bright spot lands in the tile patch the
    layout names."""
    from vlm import build_inputs

    vlm = next_vlm
    spots = [(160, 60, 120, 20), (50, 170, 20, 130), (97, 41, 30, 25), (70, 60, 52, 12)]  # (w, h, x, y)
    inputs = build_inputs(vlm, [_spot(*s) for s in spots], ["Describe the image."] * len(spots))
    assert [lt.tiles.tile_grid for lt in inputs.layouts] == [(1, 2), (2, 1), (1, 2), (2, 2)]
    p = vlm.model.config.vision_config.patch_size
    for b, (w, h, x, y) in enumerate(spots):
        layout = inputs.layouts[b]
        tiles = layout.tiles
        assert tiles is not None and tiles.geometry.original_size == (w, h)
        image_positions = torch.nonzero(inputs.input_ids[b] == vlm.image_token_id).flatten().tolist()
        assert list(layout.all_token_positions) == image_positions
        assert layout.token_positions == tuple(image_positions[:16])  # the base view comes first
        assert len(layout.newline_positions) == tiles.grid[0]
        cell = tiles.cell_of(x + 0.5, y + 0.5)
        k, pr, pc = tiles.tile_cell(*cell)
        qx, qy = tiles.geometry.to_processed(np.array([x + 0.5, y + 0.5])) - np.array(cell[::-1]) * p
        pix = inputs.pixel_values[b, k].float().mean(0)  # [S, S] of the tile the layout names
        assert pix[int(pr * p + qy), int(pc * p + qx)] > pix.max() / 2, (b, cell, (k, pr, pc))


def test_real_model_features_follow_the_layout(next_vlm):
    """The features the real model splices in (get_image_features: tower, projector, pack) are, at every
    tile cell's token, the projected tower feature of the tile patch `tile_cell` names."""
    from vlm import build_inputs

    vlm = next_vlm
    m = vlm.model.model
    rng = np.random.default_rng(0)  # noise: every tile patch gets a distinct feature
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(160, 60), (50, 170), (70, 60)]
    ]
    inputs = build_inputs(vlm, images, ["Describe the image.", "What is it?", "Describe the image."])
    with torch.no_grad():
        packed = m.get_image_features(inputs.pixel_values, inputs.image_sizes).pooler_output  # B x [N, D]
        for b, layout in enumerate(inputs.layouts):
            tiles = layout.tiles
            n = 1 + tiles.tile_grid[0] * tiles.tile_grid[1]
            hidden = m.vision_tower(inputs.pixel_values[b, :n], output_hidden_states=True).hidden_states[-2]
            per_tile = m.multi_modal_projector(hidden[:, 1:])  # [tiles + 1, g*g, D], CLS dropped ("default")
            index = {pos: i for i, pos in enumerate(layout.all_token_positions)}
            assert packed[b].shape[0] == len(index)
            g = tiles.tile_cells
            for r in range(g):
                for c in range(g):
                    got = packed[b][index[layout.token_positions[r * g + c]]]
                    torch.testing.assert_close(got, per_tile[0, r * g + c], atol=1e-4, rtol=1e-4)
            rows, cols = tiles.grid
            for r in range(rows):
                for c in range(cols):
                    k, tr, tc = tiles.tile_cell(r, c)
                    got = packed[b][index[tiles.token_positions[r * cols + c]]]
                    torch.testing.assert_close(got, per_tile[k, tr * g + tc], atol=1e-4, rtol=1e-4)
            for pos in layout.newline_positions:
                torch.testing.assert_close(packed[b][index[pos]], m.image_newline)


def test_build_inputs_rejects_a_token_count_the_model_would_not_pack(next_vlm):
    from vlm import build_inputs

    proc = next_vlm.processor
    proc.num_additional_image_tokens = 0  # the processor now emits one image token fewer than the model packs
    try:
        with pytest.raises(ValueError, match="processor emitted .* image tokens"):
            build_inputs(next_vlm, [_spot(160, 60, 120, 20)], ["Describe the image."])
    finally:
        proc.num_additional_image_tokens = 1
