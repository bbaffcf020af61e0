"""The scene magnifier in 2D: its selection rule and crop box by hand, the dense keys' attention against a
softmax over the concatenated keys, and the pipeline on the embedded model (selection stops at its layer,
nothing selected is the baseline, batch rows equal batch size 1, composition)."""

import numpy as np
import pytest
import torch

from mitigation.methods import parse_method, parse_methods
from mitigation.methods.magnifier import _DenseKeys, cells_box, magnifier_layer, select_cells, strongest_component
from mitigation.seam.hooks import AttentionCall
from mitigation.seam.request import CompositionError
from testbed.world.detail import detail_scene
from vlm import SamplingParams, build_inputs, generate
from vlm.layout import ImageLayout, clip_geometry


def test_selection_layer_rule():
    assert magnifier_layer(32) == 8 and magnifier_layer(40) == 10 and magnifier_layer(6) == 1


def test_selection_by_hand():
    rows = torch.tensor([[0.0, 1.0, 2.0, 10.0], [5.0, 5.0, 5.0, 5.0], [4.0, 0.0, 0.0, 0.0]])
    # row 0: scaled 0, 25.5, 51, 255 -> cell 3; row 1 flat -> nothing; row 2: 255, 0, 0, 0 -> cell 0
    assert select_cells(rows, 96.0).tolist() == [True, False, False, True]
    assert select_cells(rows[:1], 20.0).tolist() == [False, True, True, True]
    assert not select_cells(rows, 255.0).any()


def test_strongest_component_by_hand():
    cells = np.zeros((4, 5), dtype=bool)
    cells[0, 0] = cells[0, 1] = True  # a group of two, score 2
    cells[3, 4] = True  # a single cell, score 5
    cells[2, 2] = True  # diagonal to nothing: its own group, score 1
    score = np.ones((4, 5))
    score[3, 4] = 5.0
    assert np.array_equal(np.argwhere(strongest_component(cells, score)), [[3, 4]])
    score[3, 4] = 1.5
    assert np.array_equal(np.argwhere(strongest_component(cells, score)), [[0, 0], [0, 1]])


def test_crop_box_covers_the_selected_cells_in_original_pixels():
    geom = clip_geometry((200, 100), 32, None, (32, 32))  # processed 64 x 32, centre crop x 16..48
    layout = ImageLayout(tuple(range(16)), (4, 4), 8, geom)
    cells = np.zeros((4, 4), dtype=bool)
    cells[1, 1] = cells[2, 2] = True
    x0, y0, x1, y1 = cells_box(layout, cells)
    # processed x 8..24 -> +16 crop offset -> 24..40 of 64 -> x 75..125 of 200; y 8..24 of 32 -> 25..75 of 100
    assert (x0, y0, x1, y1) == (75, 25, 125, 75)


def test_dense_keys_take_their_softmax_share_of_text_rows():
    torch.manual_seed(0)
    B, H, Hkv, T, M, D = 2, 4, 2, 7, 3, 8
    q = torch.randn(B, H, T, D)
    k = torch.randn(B, Hkv, T, D)
    v = torch.randn(B, Hkv, T, D)
    kd, vd = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    parent = torch.tensor([[1, 2, 2], [-1, -1, -1]])  # row 1 has no crop
    hook = _DenseKeys(None, range(1, 2), torch.zeros(B, M, 16), parent, text_from=torch.tensor([4, 4]))
    hook._kv[1] = (kd, vd)
    scale = D**-0.5
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = torch.ones(T, T).tril().bool()
    std = torch.softmax((q @ kk.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1) @ vv
    out = std.transpose(1, 2)  # [B, T, H, D], as the attention function returns it
    got = hook.output(AttentionCall(1, q, k, None, scale, None), out)
    # reference: one softmax over [causal keys ; dense keys] for text rows 4..6 of row 0
    kdd, vdd = kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1)
    z = torch.cat(
        [(q @ kk.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), q @ kdd.transpose(-1, -2) * scale], -1
    )
    ref = (torch.softmax(z, -1) @ torch.cat([vv, vdd], 2)).transpose(1, 2)
    assert torch.allclose(got[0, 4:], ref[0, 4:], atol=1e-5)
    assert torch.equal(got[0, :4], out[0, :4])  # the image and system rows see no dense keys
    assert torch.allclose(got[1], out[1], atol=1e-6)  # a row without a crop is unchanged


def _img(i):
    return detail_scene(i).image


def test_selection_stops_after_its_layer_and_records_the_crop(testbed_vlm):
    vlm = testbed_vlm
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in vlm.text_model.layers]
    try:
        m = parse_method("magnifier:tokens=image")
        inputs = build_inputs(vlm, [_img(5)], ["What color is the circle?"])
        prepared = m.prepare_inputs(vlm, inputs)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == magnifier_layer(vlm.n_layers) + 1  # layers 0..selection layer, once
    view = prepared.extras[0]["magnifier"]
    assert view.box is not None and view.cells.any() and not view.cells.all()
    n_image = int((inputs.input_ids == vlm.image_token_id).sum())
    assert int((prepared.input_ids == vlm.image_token_id).sum()) == 2 * n_image  # original + crop


def test_nothing_selected_is_the_baseline(testbed_vlm):
    vlm = testbed_vlm
    inputs = build_inputs(vlm, [_img(5)], ["What color is the circle?"])
    sp = SamplingParams(max_new_tokens=6)
    base = generate(vlm, inputs, sp)[0]
    for tokens in ("keys", "image"):
        got = generate(vlm, inputs, sp, methods=parse_methods([f"magnifier:threshold=255,tokens={tokens}"]))[0]
        assert got.token_ids == base.token_ids and got.extras["magnifier"].box is None


def test_batch_rows_equal_batch_size_one(testbed_vlm):
    vlm = testbed_vlm
    imgs = [_img(7), _img(8)]
    qs = ["Is there a green triangle in the image?", "How many circles are there?"]
    sp = SamplingParams(max_new_tokens=6)
    for tokens in ("keys", "image"):
        methods = parse_methods([f"magnifier:tokens={tokens}"])
        batch = generate(vlm, build_inputs(vlm, imgs, qs), sp, methods=methods)
        for i in range(2):
            alone = generate(vlm, build_inputs(vlm, [imgs[i]], [qs[i]]), sp, methods=methods)[0]
            assert alone.token_ids == batch[i].token_ids, tokens
            assert alone.extras["magnifier"].box == batch[i].extras["magnifier"].box


def test_keys_pipeline_and_composition(testbed_vlm):
    vlm = testbed_vlm
    inputs = build_inputs(vlm, [_img(9)], ["What color is the square?"])
    sp = SamplingParams(max_new_tokens=6)
    a = generate(vlm, inputs, sp, methods=parse_methods(["magnifier"]))[0]
    assert a.extras["magnifier"].box is not None and a.extras["magnifier"].n_dense == inputs.layouts[0].n_tokens
    both = generate(vlm, inputs, sp, methods=parse_methods(["magnifier", "vhr"]))[0]
    assert both.text  # runs; VHR's second stream is untouched by the dense keys
    with pytest.raises(CompositionError, match="carve and magnifier"):
        parse_methods(["carve", "magnifier"])
    with pytest.raises(Exception, match="selection layer 5"):
        generate(vlm, inputs, sp, methods=parse_methods(["magnifier:layer=5"]))
