"""The detail split: large canvases, small objects, exact ground truth, reproducible."""

import numpy as np

from testbed.world.detail import CANVAS, detail_scene, detail_scenes, target_fraction


def test_detail_scenes_are_large_canvases_with_small_targets():
    scenes = list(detail_scenes(31337, 12))
    sizes = [s.image.size for s in scenes]
    assert all(CANVAS[0] * 0.75 - 1 <= min(sz) and max(sz) <= CANVAS[1] for sz in sizes)
    assert len(set(sizes)) > 6  # the canvas is drawn per scene
    fractions = [f for s in scenes for f in target_fraction(s)]
    assert len(fractions) >= 3 * len(scenes) * 0.8
    assert 0.02 <= min(fractions) and max(fractions) <= 0.09  # about one patch of 8 at 128 px input (6 %)
    for s in scenes:  # exact masks in the canvas's own pixels
        for o in s.objects:
            assert o.mask.shape == (s.image.size[1], s.image.size[0]) and o.mask.any()
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.bbox


def test_detail_scenes_are_reproducible_and_seeded():
    a, b = detail_scene(5), detail_scene(5)
    assert a.image.size == b.image.size and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    other = next(detail_scenes(4243, 1))
    assert not np.array_equal(
        np.asarray(next(detail_scenes(31337, 1)).image.resize((64, 64))), np.asarray(other.image.resize((64, 64)))
    )
