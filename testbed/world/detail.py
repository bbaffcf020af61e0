"""The detail split (`testbed-detail`): small targets on large canvases, where seeing detail decides the answer.

CARVE's and the scene magnifier's gains are on V* and TextVQA: small objects in large images. Here a
scene is drawn on a canvas of 384-1024 px per side (drawn per scene from its seed), its objects are 4-7 %
of the shorter side, with 3-6 objects and clutter on most scenes, so at the embedded model's 96 px
input (12 x 12 patches of 8 px) an object covers at most one patch: its colour and shape are barely
resolved unless the model looks again at a crop. The co-occurrence prior is that of the evaluation
distribution (`WorldConfig()`).

Pure: everything is a function of (seed, index). Nothing trains on this split; methods are calibrated on a
separate seed (`CALIBRATION_SEED`) and measured on `EVAL_SEED`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from testbed.world.scenes import Scene, WorldConfig, render_scene

#: The split's drawing rules (the canvas size is drawn per scene, see `detail_scene`).
DETAIL_CONFIG = WorldConfig(
    size=(512, 512), min_objects=3, max_objects=6, object_scale=(0.04, 0.07), clutter=0.8, supersample=2
)
#: Canvas side range in pixels (inclusive), drawn per scene; the aspect ratio is drawn in [3/4, 4/3].
CANVAS = (384, 1024)
EVAL_SEED = 31337
CALIBRATION_SEED = 4243


def detail_scene(seed: int, cfg: WorldConfig = DETAIL_CONFIG) -> Scene:
    """One detail scene from `seed`: a canvas size drawn from `CANVAS`, then `render_scene` on it."""
    rng = np.random.default_rng([seed, 0x5EE])
    side = int(rng.integers(CANVAS[0], CANVAS[1] + 1))
    aspect = float(rng.uniform(0.75, 4 / 3))
    w, h = (side, int(round(side / aspect))) if aspect >= 1 else (int(round(side * aspect)), side)
    return render_scene(seed, replace(cfg, size=(max(w, 16), max(h, 16))))


def detail_scenes(seed: int, n: int, cfg: WorldConfig = DETAIL_CONFIG) -> Iterator[Scene]:
    """`n` detail scenes with seeds derived from `seed` (independent streams, reproducible)."""
    for i in range(n):
        yield detail_scene(int(np.random.SeedSequence([seed, i, 0xD7]).generate_state(1)[0]), cfg)


def target_fraction(scene: Scene) -> list[float]:
    """Per visible object: its box's longer side as a fraction of the image's shorter side."""
    side = min(scene.image.size)
    return [max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) / side for o in scene.objects]
