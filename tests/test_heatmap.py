"""Heatmaps a reader can read (shares, colour bar, display size) and `ask`'s attention maps."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from grounding.heads import cache_path, explicit_selection, weights_hash
from lucid.answer import ask
from lucid.heatmap import COLORBAR_LABEL, display_map, heatmap_figure, save_heatmap
from vlm.layout import ImageLayout, clip_geometry, pad_geometry


def _layout(size: tuple[int, int], pad: bool = False) -> ImageLayout:
    geometry = (pad_geometry if pad else clip_geometry)(size, 96, None, (96, 96))
    return ImageLayout(tuple(range(144)), (12, 12), 8, geometry)


def _grid() -> np.ndarray:
    g = np.random.default_rng(0).random((12, 12))
    g[4, 7] = 5.0
    return g / g.sum()


@pytest.mark.parametrize("pad", [False, True], ids=["crop", "pad"])
def test_display_map_at_full_size_is_the_layout_painting(pad):
    layout = _layout((200, 120), pad)
    g = _grid()
    np.testing.assert_array_equal(display_map(g, layout, (200, 120)), layout.to_original_map(g))


def test_heatmap_png_has_the_colour_bar_in_shares(tmp_path):
    layout = _layout((200, 120))
    img = Image.new("RGB", (200, 120), (120, 120, 120))
    fig = heatmap_figure(img, _grid() * 7.0, layout, title="t", box=(100, 25, 125, 50), point=(112.5, 37.5))
    try:
        bars = [ax for ax in fig.axes if ax.get_ylabel() == COLORBAR_LABEL]
        assert len(bars) == 1
        lo, hi = bars[0].get_ylim()
        assert lo == 0.0 and hi == pytest.approx(_grid().max())  # normalised to shares, whatever the scale given
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    out = save_heatmap(tmp_path / "h.png", img, _grid(), layout, title="t")
    png = Image.open(out)
    assert png.format == "PNG" and png.width > png.height > 200


def test_heatmap_of_a_huge_image_is_bounded_in_size_and_memory(tmp_path):
    side = 12000
    big = Image.new("RGB", (side, side), (90, 140, 200))  # 432 MB of pixels
    layout = _layout((side, side))
    tracemalloc.start()
    try:
        save_heatmap(tmp_path / "big.png", big, _grid(), layout, box=(4000, 4000, 6000, 6000), point=(5000, 5000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 120 * 2**20  # a full-resolution float map alone would be 1.1 GB
    png = Image.open(tmp_path / "big.png")
    assert max(png.size) <= 2000


def test_ask_returns_shares_for_all_heads_and_for_chosen_heads(testbed_vlm):
    from testbed.world.scenes import WorldConfig, scenes

    img = next(iter(scenes(12345, 1, WorldConfig()))).image
    q = "Is there a red circle in the image?"
    mean = ask(testbed_vlm, img, q, attention=True)
    assert mean.attention_heads is None and mean.attention_grid.sum() == pytest.approx(1.0)
    chosen = ask(testbed_vlm, img, q, attention=True, attention_heads="0:1,2:2")
    assert chosen.attention_heads == ((0, 1), (2, 2)) and chosen.attention_grid.sum() == pytest.approx(1.0)
    assert chosen.generation.text == mean.generation.text
    assert not np.allclose(chosen.attention_grid, mean.attention_grid)
    with pytest.raises(ValueError, match="auto"):
        ask(testbed_vlm, img, q, attention=True, attention_heads="best")


def test_ask_auto_uses_the_cached_localization_heads(testbed_vlm, tmp_path, monkeypatch):
    from grounding.heads import default_calibration_name, default_params
    from testbed.world.scenes import WorldConfig, scenes

    monkeypatch.setenv("LUCID_CACHE", str(tmp_path))
    seeded = explicit_selection(testbed_vlm, [(3, 1), (1, 2)])
    seeded.save(cache_path(weights_hash(testbed_vlm), default_params(), default_calibration_name()))
    img = next(iter(scenes(12345, 1, WorldConfig()))).image
    got = ask(testbed_vlm, img, "Is there a red circle in the image?", attention=True, attention_heads="auto")
    assert got.attention_heads == ((3, 1), (1, 2))
