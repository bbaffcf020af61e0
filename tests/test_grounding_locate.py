"""`locate`: map -> box and point through the processor geometry, and end to end on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grounding import LocateParams, box_and_point, locate, locate_batch
from grounding.location import combine_heads
from grounding.readout import iter_attention
from vlm.layout import ImageLayout, clip_geometry, pad_geometry

HEADS = [(0, 1), (2, 2), (0, 3)]


def _layout(geometry) -> ImageLayout:
    return ImageLayout(tuple(range(144)), (12, 12), 8, geometry)


def _block_map(rows: slice, cols: slice, peak: tuple[int, int]) -> np.ndarray:
    g = np.zeros((12, 12))
    g[rows, cols] = 1.0
    g[peak] = 1.5
    return g / g.sum()


def test_box_and_point_through_a_center_crop_of_a_wide_image():
    # 200 x 100 image: shortest edge -> 96 gives 192 x 96, the 96 x 96 crop starts at x = 48; scale 0.96
    layout = _layout(clip_geometry((200, 100), 96, None, (96, 96)))
    g = _block_map(slice(3, 6), slice(6, 9), peak=(4, 7))
    box, point, score, smooth = box_and_point(g, layout, LocateParams(sigma=0.0, upsample=1))
    # cells cols 6..8 = processed x [48, 72) -> original (48 + 48) / 0.96 = 100 .. (72 + 48) / 0.96 = 125
    # rows 3..5 = processed y [24, 48) -> original 25 .. 50
    assert box == pytest.approx((100.0, 25.0, 125.0, 50.0))
    # cell (4, 7): processed centre (60, 36) -> original (112.5, 37.5)
    assert point == pytest.approx((112.5, 37.5))
    assert score == pytest.approx(1.0) and smooth.sum() == pytest.approx(1.0)
    # sub-cell boxes (bilinear between cell centres) contain the exact one and stay within a cell of it
    fine, _, _, _ = box_and_point(g, layout, LocateParams(sigma=0.0, upsample=8))
    cell = 8 / 0.96
    assert fine[0] <= 100.0 and fine[1] <= 25.0 and fine[2] >= 125.0 and fine[3] >= 50.0
    assert fine[0] >= 100.0 - cell and fine[1] >= 25.0 - cell and fine[2] <= 125.0 + cell and fine[3] <= 50.0 + cell


def test_box_and_point_through_pad_to_square_of_a_tall_image():
    # 100 x 200 image padded to 200 x 200 (50 px each side), resized to 96: scale 0.48, offset (-24, 0)
    layout = _layout(pad_geometry((100, 200), 96, None, (96, 96)))
    g = _block_map(slice(3, 6), slice(6, 9), peak=(3, 6))
    box, point, _, _ = box_and_point(g, layout, LocateParams(sigma=0.0, upsample=1))
    assert box == pytest.approx((50.0, 50.0, 100.0, 100.0))  # x [48, 72) -> (48 - 24) / 0.48 .. (72 - 24) / 0.48
    assert point == pytest.approx((((6.5 * 8) - 24) / 0.48, (3.5 * 8) / 0.48))
    # a region reaching into the padding is clipped to the image
    g2 = _block_map(slice(3, 6), slice(2, 5), peak=(4, 3))
    box2, _, _, _ = box_and_point(g2, layout, LocateParams(sigma=0.0, upsample=1))
    assert box2 == pytest.approx((0.0, 50.0, (40 - 24) / 0.48, 100.0))


def test_threshold_and_component_choices():
    layout = _layout(clip_geometry((96, 96), 96, None, (96, 96)))
    g = np.zeros((12, 12))
    g[1:3, 1:3] = 1.0  # a 2 x 2 blob ...
    g[8:11, 8:11] = 0.5  # ... and a larger, cooler 3 x 3 blob
    g /= g.sum()
    exact = LocateParams(sigma=0.0, upsample=1)
    largest, _, _, _ = box_and_point(g, layout, exact)
    assert largest == pytest.approx((64.0, 64.0, 88.0, 88.0))
    peak, point, _, _ = box_and_point(g, layout, LocateParams(sigma=0.0, upsample=1, component="peak"))
    assert peak == pytest.approx((8.0, 8.0, 24.0, 24.0)) and point == pytest.approx((12.0, 12.0))
    hot, _, _, _ = box_and_point(
        g, layout, LocateParams(sigma=0.0, upsample=1, threshold="peak_fraction", peak_fraction=0.8)
    )
    assert hot == pytest.approx((8.0, 8.0, 24.0, 24.0))  # only the hot blob survives 0.8 x peak
    with pytest.raises(ValueError, match="threshold"):
        LocateParams(threshold="otsu")


def test_pointing_hit_is_the_hottest_cells_centre_on_the_mask():
    from grounding.scoring import cells_on_mask, on_mask, pointing_hit, pointing_hits

    layout = _layout(clip_geometry((96, 96), 96, None, (96, 96)))  # identity: cell (r, c) = [8c, 8c + 8) x ...
    g = np.zeros((12, 12))
    g[2, 3] = 1.0  # hottest: cell (2, 3), centre (28, 20)
    g[7, 7] = 0.5
    covered = np.zeros((96, 96), bool)
    covered[16:24, 24:32] = True
    covered[20, 28] = False  # the whole cell but its centre pixel (>= 50 % coverage is not the rule)
    assert not pointing_hit(g, layout, covered)
    dot = np.zeros((96, 96), bool)
    dot[20, 28] = True  # one pixel, at the centre
    assert pointing_hit(g, layout, dot) and pointing_hit(g.reshape(-1), layout, dot)  # [rows, cols] or [N]
    assert not pointing_hit(-g, layout, dot)  # another cell is hottest
    cool = np.zeros((96, 96), bool)
    cool[60, 60] = True  # centre of cell (7, 7): second hottest only
    assert not pointing_hit(g, layout, cool)
    assert pointing_hit(np.zeros((12, 12)), layout, np.pad(np.ones((1, 1), bool), ((4, 91), (4, 91))))  # tie: (0, 0)
    assert cells_on_mask(layout, dot).sum() == 1 and cells_on_mask(layout, dot)[2, 3]
    stack = np.stack([g.reshape(-1), -g.reshape(-1)]).reshape(2, 1, 144)
    assert pointing_hits(stack, layout, dot).tolist() == [[True], [False]]
    # through a geometry: pad-to-square of a 100 x 200 image; cell (3, 6) has its centre at (58.33, 58.33)
    padded = _layout(pad_geometry((100, 200), 96, None, (96, 96)))
    m = np.zeros((200, 100), bool)
    m[58, 58] = True
    h = np.zeros((12, 12))
    h[3, 6] = 1.0
    assert pointing_hit(h, padded, m) and not on_mask(m, (58.0, -0.5)) and not on_mask(m, (100.0, 58.0))


def test_locate_end_to_end_on_the_embedded_model(testbed_vlm):
    from testbed.world.scenes import WorldConfig, scenes

    scene = next(iter(scenes(12345, 1, WorldConfig())))
    wide = scene.image.resize((160, 96))
    loc = locate(testbed_vlm, wide, f"the {scene.objects[0].name}", HEADS)
    x0, y0, x1, y1 = loc.box
    vx0, vy0, vx1, vy1 = loc.layout.geometry.visible_box()
    assert vx0 <= x0 < x1 <= vx1 and vy0 <= y0 < y1 <= vy1 and (vx0, vx1) == (32.0, 128.0)  # the centre crop
    assert vx0 <= loc.point[0] <= vx1 and 0 <= loc.point[1] <= 96
    assert loc.heads == tuple(HEADS) and 0 < loc.score <= 1
    assert loc.values.shape == (12, 12) and loc.values.sum() == pytest.approx(1.0)
    js = loc.to_json()
    assert set(js) == {"query", "box", "point", "score", "heads", "map"}
    assert set(js["map"]) == {"grid", "values"} and js["map"]["grid"] == [12, 12]
    assert js["heads"] == [list(h) for h in HEADS] and len(js["box"]) == 4 and len(js["point"]) == 2


def test_locate_batch_matches_single_calls_and_uses_the_heads(testbed_vlm):
    from testbed.world.scenes import WorldConfig, scenes

    sc = list(scenes(12345, 3, WorldConfig()))
    images = [s.image for s in sc]
    queries = [f"the {s.objects[0].name}" for s in sc]
    batch = locate_batch(testbed_vlm, images, queries, HEADS, batch_size=3)
    for img, q, b in zip(images, queries, batch):
        one = locate(testbed_vlm, img, q, HEADS)
        assert b.query == q
        np.testing.assert_allclose(b.values, one.values, atol=1e-5)
    # the combined map is the per-head shares averaged: recompute it from the raw attention
    qa = next(iter_attention(testbed_vlm, images[:1], queries[:1], "{query}", None, 1))
    manual = np.mean([qa.last[layer, h] / qa.last[layer, h].sum() for layer, h in HEADS], axis=0).reshape(12, 12)
    np.testing.assert_allclose(combine_heads(qa, HEADS, "last"), manual, rtol=1e-6)
    with pytest.raises(ValueError, match="outside the model"):
        locate(testbed_vlm, images[0], queries[0], [(0, 9)])


def test_locate_reads_a_bad_image_as_an_error(testbed_vlm, tmp_path):
    from vlm import ImageError

    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        locate(testbed_vlm, bad, "the red circle", HEADS)
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    assert locate(testbed_vlm, tmp_path / "ok.png", "the red circle", HEADS).box[2] <= 40


def test_any_checkpoint_discovers_on_a_folder_and_locates(tiny_vlm, tmp_path):
    """A randomly initialised llava-hf checkpoint (4 x 4 grid, 3 layers): the whole path runs, generic prompt."""
    import json

    from grounding import HeadParams, calibration_from_folder, discover_heads
    from testbed.world.scenes import WorldConfig, scenes

    lines = []
    for i, s in enumerate(scenes(9, 3, WorldConfig())):
        s.image.resize((120, 80)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "phrase": f"the {s.objects[0].name}"}))
    (tmp_path / "cal.jsonl").write_text("\n".join(lines))
    sel = discover_heads(tiny_vlm, calibration_from_folder(tmp_path / "cal.jsonl"), HeadParams(), cache_dir=tmp_path)
    assert len(sel.heads) == 3 and all(0 <= a < 3 and 0 <= b < 4 for a, b in sel.heads) and sel.n_samples == 3
    loc = locate(tiny_vlm, tmp_path / "0.png", "the thing", sel)
    x0, y0, x1, y1 = loc.box
    assert 20 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 80 and loc.grid == (4, 4)  # the 80 x 80 centre crop
