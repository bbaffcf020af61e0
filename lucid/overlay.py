"""The picture `lucid segment --out` writes: masks over the image, with the prompts SAM was given and,
for text queries, the localization heads' map as contours beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from lucid.heatmap import display_map  # noqa: E402
from vlm.images import display_copy  # noqa: E402

COLORS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500")


def _draw_prompts(ax, obj, sx: float, sy: float, color: str) -> None:
    for x, y, lab in obj.points:
        ax.plot(
            [(x + 0.5) * sx],
            [(y + 0.5) * sy],
            marker="*" if lab else "X",
            color="white" if lab else "black",
            ms=13,
            mec=color,
            mew=1.5,
        )
    if obj.prompt_box is not None:
        x0, y0, x1, y1 = obj.prompt_box
        ax.add_patch(
            Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, ec=color, lw=1.2, ls="--")
        )


def segment_figure(image: Image.Image, objects: Sequence, max_side: int = 1024) -> plt.Figure:
    """Masks (coloured, 45 % opaque, outlined by their boxes) with the prompts (stars: positive points,
    crosses: negative, dashed: prompt box). Objects found by attention get a left panel with the map."""
    shown, _ = display_copy(image, max_side)
    shown = shown.convert("RGB")
    w, h = shown.size
    ow, oh = image.size
    sx, sy = w / ow, h / oh
    located = [o for o in objects if o.location is not None]
    panels = 2 if located else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels * min(w / h, 2.0), 4.9), dpi=110, squeeze=False)
    axes = axes[0]
    if located:
        ax = axes[0]
        ax.imshow(shown)
        for i, o in enumerate(located):
            loc = o.location
            g = loc.values / max(loc.values.sum(), 1e-12)
            smooth = display_map(g, loc.layout, (w, h), smooth=True)
            vmax = float(np.nanmax(smooth))
            if vmax > 1.0 / g.size:
                ax.contour(
                    np.ma.masked_invalid(smooth),
                    levels=[0.5 * vmax, 0.75 * vmax],
                    colors=[COLORS[i % len(COLORS)]],
                    linewidths=[1.0, 1.8],
                )
            _draw_prompts(ax, o, sx, sy, COLORS[i % len(COLORS)])
        names = {"read": "READ's similarity map", "vl-sam": "VL-SAM's attention-flow maps"}
        what = names.get(located[0].source, "localization heads' map")
        ax.set_title(f"{what} (contours at 50/75 % of peak) and SAM prompts", fontsize=8)
    ax = axes[-1]
    canvas = np.asarray(shown, dtype=np.float32) / 255.0
    for i, o in enumerate(objects):
        m = np.asarray(Image.fromarray(o.mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
        rgb = np.array(matplotlib.colors.to_rgb(COLORS[i % len(COLORS)]), dtype=np.float32)
        canvas[m] = 0.55 * canvas[m] + 0.45 * rgb
    ax.imshow(canvas)
    for i, o in enumerate(objects):
        color = COLORS[i % len(COLORS)]
        x0, y0, x1, y1 = o.box
        ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, ec=color, lw=1.6))
        ax.text(
            x0 * sx,
            max(0.0, y0 * sy - 3),
            f"{o.label} ({o.score:.2f})",
            color="white",
            fontsize=8,
            bbox={"facecolor": color, "alpha": 0.8, "pad": 1.5, "lw": 0},
        )
        _draw_prompts(ax, o, sx, sy, color)
    ax.set_title("SAM masks (score = predicted IoU)", fontsize=8)
    for a in axes:
        a.set_xlim(-0.5, w - 0.5)
        a.set_ylim(h - 0.5, -0.5)
        a.axis("off")
    fig.tight_layout()
    return fig


def save_segment_overlay(path: str | Path, image: Image.Image, objects: Sequence, max_side: int = 1024) -> Path:
    path = Path(path)
    fig = segment_figure(image, objects, max_side)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
