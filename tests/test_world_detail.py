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


def test_the_detail_suite_asks_what_the_scenes_show():
    from evals.suites import build

    suite = build("testbed-detail:n=6")
    samples = suite.samples()
    assert {s.split for s in samples} == {"existence", "color", "count"}
    assert [s.id for s in samples] == [s.id for s in build("testbed-detail:n=6").samples()]
    for s in samples:
        if s.split == "existence" and s.target == "yes":
            x0, y0, x1, y1 = s.meta["target_box"]
            w, h = s.meta["image_size"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    yes = next(s for s in samples if s.split == "existence" and s.target == "yes")
    assert suite.judge(yes, "Yes.")["stats"] == {"pred_yes": 1, "label_yes": 1}
    color = next(s for s in samples if s.split == "color")
    assert suite.judge(color, color.target + ".")["stats"]["correct"] == 1
    assert suite.judge(color, "Purple.")["stats"]["correct"] == 0
