"""Scenes drawn by other code: matplotlib patches (its own anti-aliasing and geometry), other image
sizes, colours offset by up to +-20 per channel from the palette, no clutter.

Used to check that the embedded model recognises the shapes world, not Lucid's renderer: nothing here
shares drawing code with `testbed.world`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle, RegularPolygon  # noqa: E402
from PIL import Image  # noqa: E402

from testbed.world import CATEGORIES, PALETTE  # noqa: E402


@dataclass(frozen=True)
class ForeignScene:
    image: Image.Image
    categories: frozenset[tuple[str, str]]
    colors_by_shape: dict[str, list[str]]


def draw_foreign_scene(seed: int, size: int | None = None, jitter: int = 20) -> ForeignScene:
    rng = np.random.default_rng(seed)
    side = int(size or rng.choice([64, 128, 160, 224, 320]))
    n = int(rng.integers(1, 4))
    cats = [CATEGORIES[i] for i in rng.choice(len(CATEGORIES), size=n, replace=False)]
    bg = float(rng.uniform(80, 180)) / 255
    fig = plt.figure(figsize=(1, 1), dpi=side)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.axis("off")
    fig.patch.set_facecolor((bg, bg, bg))
    placed: list[tuple[float, float, float]] = []
    for color, shape in cats:
        for _ in range(100):
            r = float(rng.uniform(0.1, 0.17))
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
            if all(np.hypot(x - px, y - py) > r + pr + 0.02 for px, py, pr in placed):
                break
        placed.append((x, y, r))
        rgb = np.clip(np.array(PALETTE[color]) + rng.integers(-jitter, jitter + 1, 3), 0, 255) / 255
        if shape == "circle":
            patch = Circle((x, y), r, color=rgb)
        elif shape == "square":
            patch = Rectangle((x - r * 0.85, y - r * 0.85), 1.7 * r, 1.7 * r, color=rgb)
        else:  # y axis points down: a RegularPolygon with orientation pi is apex-up on screen
            patch = RegularPolygon((x, y + r * 0.2), 3, radius=r * 1.15, orientation=np.pi, color=rgb)
        ax.add_patch(patch)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=side, facecolor=fig.get_facecolor())
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf).convert("RGB")
    by_shape: dict[str, list[str]] = {}
    for color, shape in cats:
        by_shape.setdefault(shape, []).append(color)
    return ForeignScene(image=image, categories=frozenset(cats), colors_by_shape=by_shape)
