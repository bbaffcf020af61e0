"""CARVE: its pieces on hand-built arrays (layers rule, contrast and fusion, regions, refinement, the map into
original pixels), and its pipeline on the embedded model against a cache-free reference: the capture's KV
cache and early stop, the general pass's cache, batch rows equal batch size 1, the answer pass's images and
composition with a single-pass method."""

import numpy as np
import pytest
import torch
from PIL import Image

from mitigation.methods import parse_method, parse_methods
from mitigation.methods.carve import (
    GENERAL_CACHE,
    carve_layers,
    contrast_fuse,
    refine_image,
    select_regions,
)
from mitigation.seam.recorder import AttentionRecorder
from testbed.world.detail import detail_scene
from vlm import SamplingParams, build_inputs, generate
from vlm.layout import ImageLayout, clip_geometry


def test_layers_rule_for_every_depth():
    assert carve_layers(32) == [20, 21, 22, 23, 24, 25]  # range(20, 26), the code's
    assert carve_layers(40) == [20, 21, 22, 23, 24, 25]  # the paper used the same layers on 13B
    assert carve_layers(28) == [20, 21, 22, 23, 24, 25]
    assert carve_layers(6) == [3, 4]  # floor(20 * 6 / 32) .. floor(25 * 6 / 32)
    assert carve_layers(16) == [10, 11, 12]
    assert carve_layers(1) == [0]


def test_contrast_and_time_weighted_fusion_by_hand():
    q = torch.tensor([[[1.0, 2.0], [3.0, 1.0], [5.0, 5.0]], [[2.0, 2.0], [1.0, 1.0], [7.0, 7.0]]])  # [2 layers, 3, 2]
    g = torch.tensor([[[1.0, 1.0], [2.0, 4.0]], [[4.0, 2.0], [1.0, 1.0]]])  # [2 layers, 2 steps, 2]
    # all: steps paired by index up to the shorter pass (2), weights 1, 2; summed over layers
    expect = (q[0, 0] / g[0, 0] + q[1, 0] / g[1, 0]) * 1 + (q[0, 1] / g[0, 1] + q[1, 1] / g[1, 1]) * 2
    assert torch.allclose(contrast_fuse(q, g, 0.0, "all"), expect.double())
    assert torch.allclose(contrast_fuse(q, g, 0.0, "first"), (q[0, 0] / g[0, 0] + q[1, 0] / g[1, 0]).double())
    # last: each pass's own last step
    assert torch.allclose(contrast_fuse(q, g, 0.0, "last"), (q[0, 2] / g[0, 1] + q[1, 2] / g[1, 1]).double())
    lam = 0.5
    assert torch.allclose(
        contrast_fuse(q, g, lam, "first"), (q[0, 0] / (g[0, 0] + lam) + q[1, 0] / (g[1, 0] + lam)).double()
    )
    assert torch.allclose(contrast_fuse(q, None, 0.0, "first"), (q[0, 0] + q[1, 0]).double())
    with pytest.raises(ValueError, match="steps"):
        contrast_fuse(q, g, 0.0, "middle")


def _blobs() -> np.ndarray:
    s = np.zeros((20, 30))
    s[1:3, 1:3] = 5.0  # 4 px, sum 20
    s[10:12, 10:14] = 2.0  # 8 px, sum 16
    s[15:17, 25:27] = 3.0  # 4 px, sum 12
    s[5, 20] = 9.0  # 1 px, sum 9
    s[0, 29] = 1.5  # 1 px, sum 1.5
    s[19, 0] = np.nan  # never seen
    return s


def test_regions_ranked_by_attention_sum_and_both_k_rules():
    s = _blobs()
    top = 18 / (s.size - 1)  # exactly the 18 nonzero pixels pass
    mask, kept, found = select_regions(s, top, 3, "at_least")
    assert (kept, found) == (3, 5)  # max(3, floor(0.2 * 5)) = 3 of 5, by sum: 20, 16, 12
    assert mask[1:3, 1:3].all() and mask[10:12, 10:14].all() and mask[15:17, 25:27].all()
    assert not mask[5, 20] and not mask[0, 29] and mask.sum() == 16
    mask2, kept2, _ = select_regions(s, top, 2, "at_most")
    assert kept2 == 2 and mask2.sum() == 12  # the two largest sums
    # at_least with many components: floor(0.2 n) wins
    many = np.zeros((40, 40))
    many[::4, ::4] = np.arange(100, dtype=float).reshape(10, 10) + 1  # 100 isolated pixels
    m, kept3, found3 = select_regions(many, 100 / many.size, 3, "at_least")
    assert (kept3, found3) == (20, 100) and set(many[m]) == set(np.arange(81, 101, dtype=float))
    # diagonal neighbours are not connected (4-connectivity)
    diag = np.zeros((5, 5))
    diag[1, 1] = diag[2, 2] = 1.0
    assert select_regions(diag, 2 / 25, 1, "at_most")[1:] == (1, 2)
    # NaN pixels are never kept, even with top_p = 1
    assert not select_regions(s, 1.0, 3, "at_least")[0][19, 0]
    assert select_regions(np.full((3, 3), np.nan), 0.2, 3, "at_least")[1:] == (0, 0)


def test_refine_blacks_out_crops_and_upscales_with_lanczos():
    rng = np.random.default_rng(0)
    arr = rng.integers(1, 255, (60, 80, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:20, 20:30] = True
    mask[25:30, 35:40] = True
    out, box = refine_image(img, mask)
    assert box == (20, 10, 40, 30)
    crop = arr[10:30, 20:40].copy()
    crop[~mask[10:30, 20:40]] = 0
    s = max(80 / 20, 60 / 20)
    assert out.size == (round(20 * s), round(20 * s))
    assert out.tobytes() == Image.fromarray(crop).resize(out.size, Image.Resampling.LANCZOS).tobytes()
    full, box = refine_image(img, np.ones((60, 80), dtype=bool))  # everything kept: the image itself
    assert box == (0, 0, 80, 60) and full.tobytes() == img.tobytes()


def test_map_into_original_pixels_through_the_centre_crop():
    # a 200 x 100 image, shortest edge 32 then a 32 x 32 centre crop: the processed frame is x in [0, 64), crop 16..48
    geom = clip_geometry((200, 100), 32, None, (32, 32))
    layout = ImageLayout(tuple(range(16)), (4, 4), 8, geom)
    grid = np.arange(16, dtype=float).reshape(4, 4)
    near = layout.to_original_map(grid, "nearest")
    lin = layout.to_original_map(grid, "bilinear")
    assert np.isnan(near[:, :40]).all() and np.isnan(near[:, 161:]).all()  # cropped away on both sides
    assert np.array_equal(np.isnan(near), np.isnan(lin))
    # at a cell centre the bilinear map is the cell's value; between centres, the mean of the two
    x, y = geom.to_original(np.array([8 * 1.5, 8 * 2.5]))  # centre of cell (2, 1) in processed pixels
    assert lin[int(y), int(x)] == pytest.approx(grid[2, 1], abs=0.2)
    x2, y2 = geom.to_original(np.array([8 * 2.0, 8 * 2.5]))  # midway between cells (2, 1) and (2, 2)
    assert lin[int(y2), int(x2)] == pytest.approx((grid[2, 1] + grid[2, 2]) / 2, abs=0.2)
    assert np.nanmax(lin) <= 15 + 1e-9 and np.nanmin(lin) >= -1e-9  # no overshoot: a convex combination
    with pytest.raises(ValueError, match="interpolation"):
        layout.to_original_map(grid, "cubic")


# ------------------------------------------------------------------------------------------- pipeline


def _scene(i: int = 5):
    return detail_scene(i).image


def _reference_question_rows(vlm, image, question, layers, max_new_tokens):
    """The paper's capture without a KV cache: decode greedily, then one forward over prompt + answer
    recording EVERY prompt row; the rows that predicted each token are the capture's."""
    inputs = build_inputs(vlm, [image], [question])
    gen = generate(vlm, inputs, SamplingParams(max_new_tokens=max_new_tokens))[0]
    n = len(gen.token_ids) + (gen.finish_reason == "eos")
    ids = torch.tensor(
        list(gen.token_ids) + ([vlm.model.generation_config.eos_token_id] if n > len(gen.token_ids) else [])
    )
    full = torch.cat([inputs.input_ids[0], ids[: n - 1]])[None]
    rec = AttentionRecorder(layers=layers, prefill_rows="all", reduce_heads="mean")
    import mitigation

    with mitigation.scope(
        recorder=rec, image_mask=full == vlm.image_token_id, n_heads=vlm.n_heads, n_layers=vlm.n_layers
    ):
        with torch.inference_mode():
            vlm.model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs.pixel_values)
    P = inputs.input_ids.shape[1]
    return torch.stack([rec.image_attention(layer)[0, 0, P - 1 : P - 1 + n] for layer in layers])  # [L, n, N]


def test_capture_with_the_kv_cache_equals_the_cache_free_reference(testbed_vlm):
    vlm = testbed_vlm
    image = _scene()
    carve = parse_method("carve:final=refined,suffix=false,cache=false")
    q = "Is there a red circle in the image?"
    inputs = build_inputs(vlm, [image], [q])
    maps, steps, _ = carve._maps(vlm, inputs)
    layers = carve_layers(vlm.n_layers)
    ref_q = _reference_question_rows(vlm, image, q, layers, 32)
    ref_g = _reference_question_rows(vlm, image, "Write a general description of the image.", layers, 32)
    assert steps[0] == (ref_q.shape[1], ref_g.shape[1])
    expect = contrast_fuse(ref_q, ref_g, 1e-8, "all")
    assert torch.allclose(maps[0], expect, rtol=1e-4, atol=1e-6)


def test_first_step_capture_stops_after_the_last_layer_read(testbed_vlm):
    vlm = testbed_vlm
    image = _scene()
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a: calls.append(m)) for layer in vlm.text_model.layers]
    try:
        carve = parse_method("carve:steps=first,final=refined,suffix=false,cache=false")
        maps, steps, _ = carve._maps(vlm, build_inputs(vlm, [image], ["What color is the circle?"]))
    finally:
        for h in handles:
            h.remove()
    last = max(carve_layers(vlm.n_layers))
    assert len(calls) == 2 * (last + 1) < 2 * vlm.n_layers  # two passes, each through layers 0..last only
    assert steps[0] == (1, 1)
    full = parse_method("carve:final=refined,suffix=false,cache=false")._maps(
        vlm, build_inputs(vlm, [image], ["What color is the circle?"])
    )
    ref_q = _reference_question_rows(vlm, image, "What color is the circle?", carve_layers(vlm.n_layers), 1)
    ref_g = _reference_question_rows(
        vlm, image, "Write a general description of the image.", carve_layers(vlm.n_layers), 1
    )
    assert torch.allclose(maps[0], contrast_fuse(ref_q, ref_g, 1e-8, "first"), rtol=1e-4, atol=1e-6)
    assert full[1][0][0] > 1  # the full pipeline reads more steps than the first


def test_general_pass_is_cached_per_image(testbed_vlm):
    vlm = testbed_vlm
    GENERAL_CACHE.clear()
    a, b = _scene(5), _scene(6)
    carve = parse_method("carve:final=refined,suffix=false")
    m1, _, c1 = carve._maps(
        vlm,
        build_inputs(
            vlm,
            [a, a, b],
            ["What color is the circle?", "How many squares are there?", "Is there a blue square in the image?"],
        ),
    )
    assert c1 == [False, False, False] and len(GENERAL_CACHE._data) == 2  # one general row per distinct image
    m2, _, c2 = carve._maps(vlm, build_inputs(vlm, [a], ["What color is the circle?"]))
    assert c2 == [True]
    assert torch.allclose(m1[0], m2[0], rtol=1e-4, atol=1e-6)


def test_batch_rows_equal_batch_size_one(testbed_vlm):
    vlm = testbed_vlm
    imgs = [_scene(7), _scene(8)]
    qs = ["Is there a green triangle in the image?", "How many circles are there?"]  # different lengths: left padding
    methods = parse_methods(["carve:preset=paper,cache=false"])
    batch = generate(vlm, build_inputs(vlm, imgs, qs), SamplingParams(max_new_tokens=6), methods=methods)
    for i in range(2):
        alone = generate(vlm, build_inputs(vlm, [imgs[i]], [qs[i]]), SamplingParams(max_new_tokens=6), methods=methods)[
            0
        ]
        assert alone.token_ids == batch[i].token_ids
        va, vb = alone.extras["carve"], batch[i].extras["carve"]
        assert va.box == vb.box and np.array_equal(va.mask, vb.mask)
        assert np.allclose(va.map, vb.map, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_answer_pass_sees_the_refined_image_and_composes_with_vhr(testbed_vlm):
    vlm = testbed_vlm
    image = _scene(9)
    q = "What color is the square?"
    sp = SamplingParams(max_new_tokens=6)
    inputs = build_inputs(vlm, [image], [q])
    n_image = int((inputs.input_ids == vlm.image_token_id).sum())
    for final, n_images in (("refined", 1), ("both", 2)):
        carve = parse_method(f"carve:final={final},suffix=false")
        prepared = carve.prepare_inputs(vlm, inputs)
        assert int((prepared.input_ids == vlm.image_token_id).sum()) == n_images * n_image
        view = prepared.extras[0]["carve"]
        assert view.mask.shape == (image.size[1], image.size[0]) and view.map.shape == view.mask.shape
        assert view.box is not None and view.mask.any()
        # carve+vhr: VHR acts on the answer pass, exactly as VHR on the refined inputs
        images = (image, view.refined) if final == "both" else view.refined
        expect = generate(vlm, build_inputs(vlm, [images], [q]), sp, methods=parse_methods(["vhr"]))[0]
        got = generate(vlm, inputs, sp, methods=parse_methods([f"carve:final={final},suffix=false", "vhr"]))[0]
        assert got.token_ids == expect.token_ids and got.extras["carve"].box == view.box
    # the official suffix reaches every pass, once
    prepared = parse_method("carve").prepare_inputs(
        vlm, build_inputs(vlm, [image], [q + "\nAnswer the question using a single word or phrase."])
    )
    text = vlm.processor.tokenizer.decode(prepared.input_ids[0])
    assert text.count("Answer the question using a single word or phrase.") == 1


def test_everything_kept_on_a_square_image_is_the_baseline(testbed_vlm):
    vlm = testbed_vlm
    image = _scene(5).resize((300, 300))
    inputs = build_inputs(vlm, [image], ["What color is the circle?"])
    sp = SamplingParams(max_new_tokens=6)
    base = generate(vlm, inputs, sp)[0]
    got = generate(vlm, inputs, sp, methods=parse_methods(["carve:top_p=1,final=refined,suffix=false"]))[0]
    assert got.extras["carve"].box == (0, 0, 300, 300)
    assert got.token_ids == base.token_ids


def test_refuses_rows_without_sources_and_llava_next(testbed_vlm):
    from dataclasses import replace

    from mitigation.methods import MethodError

    vlm = testbed_vlm
    inputs = replace(build_inputs(vlm, [_scene()], ["What color is the circle?"]), sources=())
    with pytest.raises(MethodError, match="source images"):
        generate(vlm, inputs, SamplingParams(max_new_tokens=2), methods=parse_methods(["carve"]))


def test_crop_quality_of_a_record_by_hand():
    from pycocotools import mask as mask_utils

    from evals.job import crop_quality

    m = np.zeros((40, 60), dtype=np.uint8)
    m[10:20, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    extras = {"carve": {"mask": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}}}
    got = crop_quality({"target_box": [20, 10, 40, 20]}, extras)  # half of the target inside the mask
    assert got == {"method": "carve", "target_coverage": 0.5, "hit": True, "kept_fraction": round(200 / 2400, 6)}
    assert crop_quality({"target_box": [40, 20, 60, 40]}, extras)["hit"] is False
    assert crop_quality({}, extras) is None and crop_quality({"target_box": [0, 0, 1, 1]}, None) is None


def test_oracle_view_frames_the_answers_objects():
    from evals.suites import build

    full = build("testbed-detail:n=3").samples()
    oracle = build("testbed-detail:n=3,view=oracle").samples()
    assert [s.id for s in full] == [s.id for s in oracle] and [s.target for s in full] == [s.target for s in oracle]
    for f, o in zip(full, oracle):
        x0, y0, x1, y1 = o.meta["oracle_box"]
        assert o.image.size[0] >= f.image.size[0] or o.image.size[1] >= f.image.size[1]  # zoomed to the original size
        if "target_box" in f.meta:
            tx0, ty0, tx1, ty1 = f.meta["target_box"]
            assert x0 <= tx0 and y0 <= ty0 and tx1 <= x1 and ty1 <= y1  # the target is inside the crop
            ox0, oy0, ox1, oy1 = o.meta["target_box"]
            assert 0 <= ox0 < ox1 <= o.image.size[0] + 1 and 0 <= oy0 < oy1 <= o.image.size[1] + 1


def test_detail_view_must_be_full_or_oracle():
    from evals.suites import build
    from evals.suites.base import SuiteError

    with pytest.raises(SuiteError, match="view must be full or oracle, got 'zoom'"):
        build("testbed-detail:n=2,view=zoom")
