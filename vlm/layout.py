"""ImageLayout: where the image tokens are, and the exact geometry between patch cells and pixels of
the ORIGINAL image.

The geometry inverts the checkpoint's own image processor: CLIP-style "resize the shortest edge,
then center-crop" (llava-hf 1.5 default) or LLaVA's "pad to square, then resize" (`do_pad`). Frames:

* original: (x, y) pixels of the image the user gave, origin top-left, x to the right;
* processed: (x, y) pixels of `pixel_values` (the crop the vision tower sees);
* grid: (row, col) patch cells, cell (r, c) covers processed pixels [c*p, (c+1)*p) x [r*p, (r+1)*p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageGeometry:
    """The affine map original -> processed pixels of one image: processed = original * scale - offset.

    Attributes:
        original_size: (width, height) of the original image.
        processed_size: (width, height) of the vision input.
        scale: (sx, sy) original -> resized pixels.
        offset: (ox, oy) subtracted after scaling (center-crop offset, or minus the padding offset).
    """

    original_size: tuple[int, int]
    processed_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    def to_processed(self, xy: np.ndarray) -> np.ndarray:
        """[..., 2] original (x, y) -> processed (x, y)."""
        xy = np.asarray(xy, dtype=np.float64)
        return xy * np.array(self.scale) - np.array(self.offset)

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """[..., 2] processed (x, y) -> original (x, y)."""
        xy = np.asarray(xy, dtype=np.float64)
        return (xy + np.array(self.offset)) / np.array(self.scale)

    def visible_box(self) -> tuple[float, float, float, float]:
        """The part of the original image the vision tower sees, (x0, y0, x1, y1) in original pixels."""
        (x0, y0), (x1, y1) = self.to_original(np.array([[0.0, 0.0], list(self.processed_size)]))
        w, h = self.original_size
        return (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))


def clip_geometry(
    original_size: tuple[int, int],
    shortest_edge: int | None,
    size_hw: tuple[int, int] | None,
    crop_hw: tuple[int, int] | None,
) -> ImageGeometry:
    """Geometry of transformers' resize (shortest edge, or fixed height x width) then center crop."""
    w, h = original_size
    if shortest_edge is not None:
        # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = shortest_edge, int(shortest_edge * long / short)
        rw, rh = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        rh, rw = size_hw
    if crop_hw is None:
        cw, ch = rw, rh
        ox = oy = 0
    else:
        ch, cw = crop_hw
        ox, oy = (rw - cw) // 2, (rh - ch) // 2
    return ImageGeometry((w, h), (cw, ch), (rw / w, rh / h), (float(ox), float(oy)))


def pad_geometry(
    original_size: tuple[int, int],
    shortest_edge: int | None,
    size_hw: tuple[int, int] | None,
    crop_hw: tuple[int, int] | None,
) -> ImageGeometry:
    """Geometry of LLaVA's pad-to-square (image centred on the longer edge), resize, center crop."""
    w, h = original_size
    m = max(w, h)
    px, py = ((m - w) // 2, 0) if h > w else (0, (m - h) // 2)
    if w == h:
        px = py = 0
    inner = clip_geometry((m, m), shortest_edge, size_hw, crop_hw)
    s = inner.scale[0]
    return ImageGeometry((w, h), inner.processed_size, (s, s), (inner.offset[0] - px * s, inner.offset[1] - py * s))


@dataclass(frozen=True)
class ImageLayout:
    """One request row's image tokens and their geometry.

    Attributes:
        token_positions: positions in the (padded) input_ids row of the image tokens, in order.
        grid: (rows, cols) of the patch grid those tokens fill, row-major.
        patch_size: pixels per patch side in the processed frame.
        geometry: original <-> processed pixel map.
    """

    token_positions: tuple[int, ...]
    grid: tuple[int, int]
    patch_size: int
    geometry: ImageGeometry

    def __post_init__(self) -> None:
        if len(self.token_positions) != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"{len(self.token_positions)} image tokens do not fill a {self.grid[0]}x{self.grid[1]} grid"
            )

    @property
    def n_tokens(self) -> int:
        return len(self.token_positions)

    def cell_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Pixel box (x0, y0, x1, y1) in the ORIGINAL image covered by grid cell (row, col)."""
        p = self.patch_size
        (x0, y0), (x1, y1) = self.geometry.to_original(np.array([[col * p, row * p], [(col + 1) * p, (row + 1) * p]]))
        return (float(x0), float(y0), float(x1), float(y1))

    def cell_of(self, x: float, y: float) -> tuple[int, int] | None:
        """Grid cell containing original pixel (x, y), or None if the processor cropped it away."""
        px, py = self.geometry.to_processed(np.array([x, y]))
        col, row = int(np.floor(px / self.patch_size)), int(np.floor(py / self.patch_size))
        if 0 <= row < self.grid[0] and 0 <= col < self.grid[1]:
            return (row, col)
        return None

    def cell_center(self, row: int, col: int) -> tuple[float, float]:
        """Centre of grid cell (row, col) in original pixels."""
        x0, y0, x1, y1 = self.cell_box(row, col)
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def to_original_map(self, grid_values: np.ndarray) -> np.ndarray:
        """Paint a [rows, cols] grid map onto the original image frame: [H, W] (nearest cell; pixels the
        processor cropped or padded away get NaN)."""
        w, h = self.geometry.original_size
        ys, xs = np.mgrid[0:h, 0:w]
        pxy = self.geometry.to_processed(np.stack([xs + 0.5, ys + 0.5], -1))
        col = np.floor(pxy[..., 0] / self.patch_size).astype(int)
        row = np.floor(pxy[..., 1] / self.patch_size).astype(int)
        ok = (row >= 0) & (row < self.grid[0]) & (col >= 0) & (col < self.grid[1])
        out = np.full((h, w), np.nan, dtype=np.float64)
        out[ok] = np.asarray(grid_values, dtype=np.float64)[row[ok], col[ok]]
        return out
