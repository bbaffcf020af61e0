"""Pictures of where a model looked: the image with the map's contours, and the map itself with a colour
bar in shares of the image attention.

Everything is drawn on a display-size copy of the image (longest side `max_side`), and the map is
painted at that resolution straight through the processor geometry (display pixel -> original pixel ->
processed pixel -> patch cell), so a 12000 x 12000 photo costs memory for the picture, not for its pixels.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from vlm.images import display_copy  # noqa: E402
from vlm.layout import ImageLayout  # noqa: E402

COLORBAR_LABEL = "share of image attention"


def display_map(grid: np.ndarray, layout: ImageLayout, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Paint a [rows, cols] grid map on a (width, height) display frame of the ORIGINAL image.

    Display pixel (u, v) covers original pixels scaled by original_size / size. `smooth=False` gives each
    pixel its cell's value (honest cells); `smooth=True` interpolates bilinearly between cell centres (for
    contour lines). Pixels the vision tower never saw (cropped or padded away) are NaN. Returns [h, w].
    """
    g = np.asarray(grid, dtype=np.float64)
    w, h = size
    ow, oh = layout.geometry.original_size
    xs = (np.arange(w) + 0.5) * (ow / w)
    ys = (np.arange(h) + 0.5) * (oh / h)
    # the geometry is separable (scale and offset per axis): map each axis once, not every pixel
    px = layout.geometry.to_processed(np.stack([xs, np.zeros_like(xs)], -1))[:, 0] / layout.patch_size
    py = layout.geometry.to_processed(np.stack([np.zeros_like(ys), ys], -1))[:, 1] / layout.patch_size
    rows, cols = layout.grid
    ok = (py >= 0) & (py < rows)
    okx = (px >= 0) & (px < cols)
    if smooth:
        cy = np.clip(py - 0.5, 0, rows - 1)
        cx = np.clip(px - 0.5, 0, cols - 1)
        r0, c0 = np.floor(cy).astype(int), np.floor(cx).astype(int)
        r1, c1 = np.minimum(r0 + 1, rows - 1), np.minimum(c0 + 1, cols - 1)
        fy, fx = (cy - r0)[:, None], (cx - c0)[None, :]
        out = (g[r0][:, c0] * (1 - fx) + g[r0][:, c1] * fx) * (1 - fy) + (
            g[r1][:, c0] * (1 - fx) + g[r1][:, c1] * fx
        ) * fy
    else:
        r = np.clip(np.floor(py).astype(int), 0, rows - 1)
        c = np.clip(np.floor(px).astype(int), 0, cols - 1)
        out = g[r][:, c]
    out = out.astype(np.float64)
    out[~ok, :] = np.nan
    out[:, ~okx] = np.nan
    return out


def heatmap_figure(
    image: Image.Image,
    grid: np.ndarray,
    layout: ImageLayout,
    title: str = "",
    box: tuple[float, float, float, float] | None = None,
    point: tuple[float, float] | None = None,
    max_side: int = 1024,
) -> plt.Figure:
    """The figure `save_heatmap` writes (see there); the caller closes it."""
    g = np.clip(np.asarray(grid, dtype=np.float64), 0.0, None)
    g = g / g.sum() if g.sum() > 0 else np.full(g.shape, 1.0 / g.size)
    shown = display_copy(image, max_side)[0].convert("RGB")  # small: converting it is cheap
    w, h = shown.size
    sx, sy = w / layout.geometry.original_size[0], h / layout.geometry.original_size[1]
    cells = display_map(g, layout, (w, h))
    smooth = display_map(g, layout, (w, h), smooth=True)
    uniform = 1.0 / g.size
    vmax = float(g.max())

    aspect = w / h
    fig = plt.figure(figsize=(2 * 4.2 * min(aspect, 2.0) + 1.8, 4.2 + (0.5 if title else 0.0)), dpi=110)
    ax_img = fig.add_axes([0.02, 0.06, 0.40, 0.8 if title else 0.88])
    ax_map = fig.add_axes([0.44, 0.06, 0.40, 0.8 if title else 0.88])
    ax_bar = fig.add_axes([0.885, 0.1, 0.015, 0.7 if title else 0.78])
    ax_img.imshow(shown)
    unseen = np.isnan(cells)
    if unseen.any():  # what the processor cropped away: dimmed, the model never saw it
        ax_img.imshow(np.dstack([np.zeros_like(cells), np.zeros_like(cells), np.zeros_like(cells), 0.55 * unseen]))
    if vmax > uniform:
        levels = [lv for lv in (0.25 * vmax, 0.5 * vmax, 0.75 * vmax) if lv > uniform] or [0.5 * vmax]
        cs = ax_img.contour(
            np.ma.masked_invalid(smooth), levels=levels, colors=["#00e5ff"], linewidths=[0.8, 1.3, 1.9][-len(levels) :]
        )
        ax_img.clabel(cs, fmt=lambda v: f"{100 * v:.1f}%", fontsize=7)
    ax_img.set_title(
        "image, contours of the map" + (" (dimmed: not seen by the model)" if unseen.any() else ""), fontsize=9
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
    im = ax_map.imshow(
        np.ma.masked_invalid(cells), cmap=cmap, vmin=0.0, vmax=max(vmax, uniform), interpolation="nearest"
    )
    ax_map.set_title(f"attention per patch ({layout.grid[0]}x{layout.grid[1]} cells)", fontsize=9)
    for ax in (ax_img, ax_map):
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(
                Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, ec="#ff3b30", lw=1.6)
            )
        if point is not None:
            ax.plot([point[0] * sx], [point[1] * sy], marker="+", color="#ff3b30", ms=12, mew=2)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.axis("off")
    bar = fig.colorbar(im, cax=ax_bar)
    bar.set_label(COLORBAR_LABEL, fontsize=9)
    bar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    bar.ax.axhline(uniform, color="white", lw=1.5)
    bar.ax.text(
        -0.4,
        uniform,
        f"uniform\n(1/{g.size})",
        transform=bar.ax.get_yaxis_transform(),
        ha="right",
        va="center",
        fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_heatmap(
    path: str | Path,
    image: Image.Image,
    grid: np.ndarray,
    layout: ImageLayout,
    title: str = "",
    box: tuple[float, float, float, float] | None = None,
    point: tuple[float, float] | None = None,
    max_side: int = 1024,
) -> Path:
    """Write a PNG: left, the image with the map's contour lines (and the box / point if given; what the
    processor cropped away is dimmed); right, the map alone, each patch cell coloured by its share, with a
    colour bar "share of image attention" on which the uniform share 1/N is marked.

    Args:
        grid: [rows, cols] non-negative attention over the image tokens; normalised here to sum to 1, so
            the colours read as shares.
        layout: the image's `ImageLayout` (grid and processor geometry).
        box, point: (x0, y0, x1, y1) and (x, y) in ORIGINAL image pixels.
        max_side: longest side of the display copy the picture is drawn from (bounds time and memory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = heatmap_figure(image, grid, layout, title, box, point, max_side)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def views_figure(image: Image.Image, extras: dict, title: str = "", max_side: int = 768):
    """What the methods made for an answer, side by side: the image, then each extra's `panels()` (a list of
    (title, kind, value): kind "map" an [H, W] float map in original pixels (NaN: never seen), "mask" an
    [H, W] bool mask, "image" a PIL image, "box" an (x0, y0, x1, y1) drawn on the image panel)."""
    panels = [p for v in extras.values() if hasattr(v, "panels") for p in v.panels()]
    shown = [p for p in panels if p[1] != "box"]
    small, _ = display_copy(image, max_side)
    sx, sy = small.size[0] / image.size[0], small.size[1] / image.size[1]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(3.2 * (1 + len(shown)), 3.6), squeeze=False)
    ax0 = axes[0, 0]
    ax0.imshow(small)
    ax0.set_title("image", fontsize=9)
    for _name, kind, value in panels:
        if kind == "box" and value is not None:
            x0, y0, x1, y1 = value
            ax0.add_patch(
                Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, color="lime", lw=1.5)
            )
    for ax, (name, kind, value) in zip(axes[0, 1:], shown, strict=True):
        if kind == "image":
            ax.imshow(display_copy(value, max_side)[0])
        else:
            arr = np.asarray(value, dtype=np.float64 if kind == "map" else np.uint8)
            step = max(1, int(np.ceil(max(arr.shape) / max_side)))  # subsample a large map for display
            arr = arr[::step, ::step]
            if kind == "map":
                ax.imshow(small.resize((arr.shape[1], arr.shape[0])), alpha=0.35)
                ax.imshow(np.ma.masked_invalid(arr), cmap="inferno", alpha=0.75)
            else:
                ax.imshow(small.resize((arr.shape[1], arr.shape[0])))
                ax.imshow(np.ma.masked_equal(arr, 1), cmap="gray", vmin=0, vmax=1, alpha=0.8)
        ax.set_title(name, fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_views(path: str | Path, image: Image.Image, extras: dict, title: str = "") -> Path:
    """Write `views_figure` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = views_figure(image, extras, title)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
