"""Pictures: an attention grid painted over the ORIGINAL image through the processor geometry."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vlm.layout import ImageLayout  # noqa: E402


def overlay(image: Image.Image, grid: np.ndarray, layout: ImageLayout, alpha: float = 0.55) -> Image.Image:
    """Blend a [rows, cols] attention grid (min-max normalised) over `image` with the 'inferno' map.
    Pixels the vision tower never saw (cropped away) are left as they are."""
    g = np.asarray(grid, dtype=np.float64)
    lo, hi = float(np.nanmin(g)), float(np.nanmax(g))
    g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    full = layout.to_original_map(g)
    rgba = plt.get_cmap("inferno")(np.nan_to_num(full, nan=0.0))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    seen = ~np.isnan(full)[..., None]
    out = np.where(seen, (1 - alpha) * base + alpha * rgba, base)
    return Image.fromarray((out * 255).round().astype(np.uint8))


def save_heatmap(path: str | Path, image: Image.Image, grid: np.ndarray, layout: ImageLayout, title: str = "") -> Path:
    """Write a PNG: the image, and the image with the attention overlay, side by side."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=110)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(overlay(image, grid, layout))
    axes[1].set_title("answer's attention on image tokens")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
