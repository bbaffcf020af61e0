"""ImageLayout geometry against the real transformers image processors, on non-square images."""

import numpy as np
import pytest
from PIL import Image

from vlm.layout import ImageLayout, clip_geometry, pad_geometry


def _spot_image(w, h, x, y, r=3):
    a = np.zeros((h, w, 3), np.uint8)
    a[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = 255
    return Image.fromarray(a)


def _processed_centroid(processor, image):
    px = processor(image, return_tensors="np")["pixel_values"][0]  # [3, H, W] normalised
    lum = px.mean(0)
    mask = lum > (lum.max() + lum.min()) / 2
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def _processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    pad = LlavaImageProcessorPil(
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        do_pad=True,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    return [("crop", clip, clip_geometry), ("pad", pad, pad_geometry)]


@pytest.mark.parametrize("w,h", [(160, 96), (96, 160), (100, 100), (57, 131), (333, 120)])
@pytest.mark.parametrize("kind", ["crop", "pad"])
def test_geometry_matches_processor(kind, w, h):
    name, proc, geom_fn = next(p for p in _processors() if p[0] == kind)
    geom = geom_fn((w, h), 48, None, (48, 48))
    rng = np.random.default_rng(w * 1000 + h)
    checked = 0
    for _ in range(6):
        x0, x1 = geom.visible_box()[0::2]
        y0, y1 = geom.visible_box()[1::2]
        x = int(rng.uniform(x0 + 6, x1 - 6))
        y = int(rng.uniform(y0 + 6, y1 - 6))
        got = _processed_centroid(proc, _spot_image(w, h, x, y))
        want = geom.to_processed(np.array([x + 0.5, y + 0.5]))
        assert np.abs(got - want).max() < 1.0, (kind, (w, h), (x, y), got, want)
        checked += 1
    assert checked == 6


@pytest.mark.parametrize("w,h", [(160, 96), (57, 131)])
def test_cells_round_trip(w, h):
    geom = clip_geometry((w, h), 48, None, (48, 48))
    layout = ImageLayout(tuple(range(36)), (6, 6), 8, geom)
    for r in range(6):
        for c in range(6):
            cx, cy = layout.cell_center(r, c)
            assert layout.cell_of(cx, cy) == (r, c)
            x0, y0, x1, y1 = layout.cell_box(r, c)
            assert x0 < cx < x1 and y0 < cy < y1
    # the processor crops the long side: its ends map to no cell
    if w > h:
        assert layout.cell_of(0.5, h / 2) is None
    full = layout.to_original_map(np.arange(36).reshape(6, 6))
    assert full.shape == (h, w)
    assert np.isnan(full).any() and np.nanmax(full) == 35


def test_pad_geometry_maps_every_original_pixel_to_a_cell():
    geom = pad_geometry((160, 96), 48, None, (48, 48))
    layout = ImageLayout(tuple(range(36)), (6, 6), 8, geom)
    full = layout.to_original_map(np.ones((6, 6)))
    assert not np.isnan(full).any()


def test_layout_rejects_token_count_mismatch():
    geom = clip_geometry((48, 48), 48, None, (48, 48))
    with pytest.raises(ValueError, match="do not fill"):
        ImageLayout(tuple(range(35)), (6, 6), 8, geom)
