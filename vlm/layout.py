"""ImageLayout: where the image tokens are, and the exact geometry between patch cells and pixels of
the ORIGINAL image.

The geometry inverts the checkpoint's own image processor: CLIP-style "resize the shortest edge,
then center-crop" (llava-hf 1.5 default), LLaVA's "pad to square, then resize" (`do_pad`), and
LLaVA-NeXT's two views (the whole image stretched to the base input, then the high-resolution tiles,
see `anyres_view`). Frames:

* original: (x, y) pixels of the image the user gave, origin top-left, x to the right;
* processed: (x, y) pixels of the view's own canvas: `pixel_values` (the crop the vision tower sees)
  for a single view, the unpadded tile canvas for LLaVA-NeXT's high-resolution view;
* grid: (row, col) patch cells, cell (r, c) covers processed pixels [c*p, (c+1)*p) x [r*p, (r+1)*p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageGeometry:
    """The affine map original -> processed pixels of one image: processed = original * scale - offset.

    Attributes:
        original_size: (width, height) of the original image.
        processed_size: (width, height) of the processed frame (the vision input, or the tile canvas).
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
class ImageView:
    """One view of the image: a [rows, cols] grid of patch cells, one image token per cell.

    Attributes:
        token_positions: positions in the (padded) input_ids row of the view's cell tokens, row-major:
            cell (r, c) is token_positions[r * cols + c]. Tokens that are no cell (LLaVA-NeXT's
            newlines) are not here.
        grid: (rows, cols) of the patch grid those tokens fill.
        patch_size: pixels per patch side in the processed frame.
        geometry: original <-> processed pixel map of this view.
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

    def to_original_map(self, grid_values: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
        """Paint a [rows, cols] grid map onto the original image frame: [H, W] float64; pixels the processor
        cropped or padded away get NaN. `interpolation`: "nearest" (each pixel takes its cell's value) or
        "bilinear" (between cell centres, clamped at the grid's edge: a bilinear resize of the grid, through
        the processor's true geometry rather than over the whole original image)."""
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        w, h = self.geometry.original_size
        ys, xs = np.mgrid[0:h, 0:w]
        pxy = self.geometry.to_processed(np.stack([xs + 0.5, ys + 0.5], -1))
        gx, gy = pxy[..., 0] / self.patch_size, pxy[..., 1] / self.patch_size  # in cells
        ok = (gy >= 0) & (gy < self.grid[0]) & (gx >= 0) & (gx < self.grid[1])
        values = np.asarray(grid_values, dtype=np.float64)
        out = np.full((h, w), np.nan, dtype=np.float64)
        if interpolation == "nearest":
            out[ok] = values[np.floor(gy[ok]).astype(int), np.floor(gx[ok]).astype(int)]
            return out
        from scipy.ndimage import map_coordinates

        out[ok] = map_coordinates(values, np.stack([gy[ok] - 0.5, gx[ok] - 0.5]), order=1, mode="nearest")
        return out


@dataclass(frozen=True)
class TiledView(ImageView):
    """LLaVA-NeXT's high-resolution view, as the model packs it (`pack_image_features`).

    The processor resizes the image (aspect kept) into the chosen `best_resolution` canvas, centres it
    with zero padding, and cuts the canvas into `tile_grid` tiles of the base input size. The model puts
    the tiles' patch features side by side, a [tile_rows * tile_cells, tile_cols * tile_cells] map, and
    `unpad_image` removes whole rows (or columns) of cells symmetrically at both ends: `grid` is what is
    left. After every grid row the model appends one `image_newline` token, which is no cell. The unpad
    rounds the image's extent down to whole cells, so a strip of under one patch of canvas (about p/2 per
    side) at two opposite edges of the image is in no tile cell: `cell_of` gives None and
    `to_original_map` NaN there (the base view still covers it).

    Processed frame of `geometry`: (x, y) pixels of the unpadded canvas, i.e. the padded
    best-resolution canvas shifted by -cell_offset * patch_size; cell (r, c) covers
    [c*p, (c+1)*p) x [r*p, (r+1)*p) of it, and is padded-map cell (r + cell_offset[0], c + cell_offset[1]).

    Attributes (beyond ImageView's):
        tile_grid: (rows, cols) of tiles; tile (i, j) is pixel_values[b, 1 + i * cols + j] (0 is the base view).
        tile_cells: patch cells per tile side (the base view's grid side).
        cell_offset: (rows, cols) of padded-map cells the unpad crop removed at the top and at the left.
        newline_positions: input_ids positions of the newline tokens, one after each grid row: [rows].
    """

    tile_grid: tuple[int, int]
    tile_cells: int
    cell_offset: tuple[int, int]
    newline_positions: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.newline_positions) != self.grid[0]:
            raise ValueError(f"{len(self.newline_positions)} newline tokens for {self.grid[0]} grid rows")

    def tile_cell(self, row: int, col: int) -> tuple[int, int, int]:
        """Where grid cell (row, col) comes from: (tile index k into the row's pixel_values [P, 3, S, S],
        patch row, patch col inside that tile); the cell is tile k's patch token r * tile_cells + c."""
        i, r = divmod(row + self.cell_offset[0], self.tile_cells)
        j, c = divmod(col + self.cell_offset[1], self.tile_cells)
        return (1 + i * self.tile_grid[1] + j, r, c)


@dataclass(frozen=True)
class ImageLayout(ImageView):
    """One request row's image tokens and their geometry.

    The inherited ImageView fields and methods are the base view: the whole image (LLaVA-1.5: the only
    view; LLaVA-NeXT: the whole image stretched to the square input, whose tokens come first).

    Attributes:
        token_positions: positions in the (padded) input_ids row of the base view's tokens, row-major.
        grid: (rows, cols) of the base patch grid.
        patch_size: pixels per patch side in the processed frame.
        geometry: original <-> processed pixel map of the base view.
        tiles: LLaVA-NeXT's high-resolution view (its tokens follow the base view's), else None.
    """

    tiles: TiledView | None = None

    @property
    def newline_positions(self) -> tuple[int, ...]:
        """input_ids positions of LLaVA-NeXT's newline image tokens (empty without tiles)."""
        return self.tiles.newline_positions if self.tiles is not None else ()

    @property
    def all_token_positions(self) -> tuple[int, ...]:
        """Every image-token position of the row, in input order: base, tile cells and newlines."""
        if self.tiles is None:
            return self.token_positions
        return tuple(sorted(self.token_positions + self.tiles.token_positions + self.tiles.newline_positions))


def select_best_resolution(original_hw: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the (height, width) pinpoint that keeps the most original
    pixels after an aspect-preserving fit, ties broken by the least padding. `original_hw` is (height, width)."""
    oh, ow = original_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


@dataclass(frozen=True)
class _Anyres:
    geometry: ImageGeometry
    grid: tuple[int, int]
    tile_grid: tuple[int, int]
    tile_cells: int
    cell_offset: tuple[int, int]


def _anyres(original_size: tuple[int, int], pinpoints: list, tile_size: int, patch_size: int) -> _Anyres:
    w, h = original_size
    bh, bw = select_best_resolution((h, w), pinpoints)
    if bh % tile_size or bw % tile_size or tile_size % patch_size:
        raise ValueError(
            f"best resolution {bh}x{bw} (h x w) is not a whole number of {tile_size} px tiles "
            f"of {patch_size} px patches"
        )
    # image_processing_utils.get_patch_output_size: the aspect-preserving resize into the canvas
    sx, sy = bw / w, bh / h
    if sx < sy:
        nw, nh = bw, min(math.ceil(h * sx), bh)
    else:
        nw, nh = min(math.ceil(w * sy), bw), bh
    paste_x, paste_y = (bw - nw) // 2, (bh - nh) // 2  # _pad_for_patching: centred, the odd pixel at the end
    g = tile_size // patch_size
    tiles = (bh // tile_size, bw // tile_size)
    # modeling_llava_next.unpad_image on the [tiles_h * g, tiles_w * g] feature map, in cells
    ch, cw = tiles[0] * g, tiles[1] * g
    r0 = c0 = 0
    rows, cols = ch, cw
    if w / h > cw / ch:  # int(round(x, 7)): a floor that forgives float error, not a rounding
        new_h = int(round(h * (cw / w), 7))
        r0 = (ch - new_h) // 2
        rows = ch - 2 * r0
    else:
        new_w = int(round(w * (ch / h), 7))
        c0 = (cw - new_w) // 2
        cols = cw - 2 * c0
    p = patch_size
    geometry = ImageGeometry(
        (w, h), (cols * p, rows * p), (nw / w, nh / h), (float(c0 * p - paste_x), float(r0 * p - paste_y))
    )
    return _Anyres(geometry, (rows, cols), tiles, g, (r0, c0))


def anyres_token_count(original_size: tuple[int, int], pinpoints: list, tile_size: int, patch_size: int) -> int:
    """Number of image tokens of LLaVA-NeXT's high-resolution view (cells + one newline per row) for an
    image of `original_size` (width, height); `pinpoints` are the processor's `image_grid_pinpoints`,
    [(height, width), ...] in pixels; `tile_size` is the base input side (pixels)."""
    a = _anyres(original_size, pinpoints, tile_size, patch_size)
    return a.grid[0] * (a.grid[1] + 1)


def anyres_view(
    original_size: tuple[int, int],
    pinpoints: list,
    tile_size: int,
    patch_size: int,
    token_positions: tuple[int, ...] | list[int],
) -> TiledView:
    """LLaVA-NeXT's high-resolution view, with transformers' exact integer arithmetic
    (`select_best_resolution`, `get_patch_output_size`, `_pad_for_patching`, `divide_to_patches`,
    `unpad_image`).

    Args:
        original_size: (width, height) of the original image.
        pinpoints: the processor's `image_grid_pinpoints`, [(height, width), ...] in pixels.
        tile_size: side of one tile = of the base input, in pixels (pixel_values[..., S, S]).
        patch_size: pixels per vision patch side.
        token_positions: input_ids positions of the view's tokens as the model packs them: per grid row,
            the row's cells then one newline; [rows * (cols + 1)].

    Raises:
        ValueError: the positions do not have the count the packing gives, or the pinpoints are not
            whole tiles.
    """
    a = _anyres(original_size, pinpoints, tile_size, patch_size)
    rows, cols = a.grid
    if len(token_positions) != rows * (cols + 1):
        raise ValueError(
            f"{len(token_positions)} high-resolution image tokens, but a {original_size[0]}x{original_size[1]} image "
            f"packs into {rows}x{cols} cells + {rows} newlines = {rows * (cols + 1)}"
        )
    pos = list(token_positions)
    cells = tuple(x for r in range(rows) for x in pos[r * (cols + 1) : r * (cols + 1) + cols])
    newlines = tuple(pos[r * (cols + 1) + cols] for r in range(rows))
    return TiledView(cells, a.grid, patch_size, a.geometry, a.tile_grid, a.tile_cells, a.cell_offset, newlines)
