"""Operations on 2-D attention maps: connected components, Gaussian smoothing, bilinear upsampling.

Pure numpy on small maps (a patch grid, or a few sub-cells per patch), shared by head discovery (spatial
entropy) and localization (mask -> box). A map is [rows, cols], row-major like the image-token grid:
row r, column c is grid cell (r, c).
"""

from __future__ import annotations

import numpy as np

_SHIFTS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_SHIFTS8 = _SHIFTS4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


def connected_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected regions of a boolean map.

    Args:
        mask: [rows, cols] bool.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        (labels, n): labels [rows, cols] int64, 0 outside the mask and 1..n inside, numbered in row-major
        order of each component's first cell; n the number of components.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rows, cols = mask.shape
    if not mask.any():
        return np.zeros((rows, cols), dtype=np.int64), 0
    big = rows * cols
    # Every cell starts labelled with its own flat index; repeatedly take the smallest label among the
    # cell and its in-mask neighbours, then jump each label to its root's label (pointer jumping), until
    # nothing changes: each component ends labelled with the flat index of its first cell.
    lab = np.where(mask, np.arange(big).reshape(rows, cols), big)
    shifts = _SHIFTS8 if connectivity == 8 else _SHIFTS4
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        low = lab.copy()
        for dr, dc in shifts:
            low = np.minimum(low, pad[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols])
        low = np.where(mask, low, big)
        flat = low.ravel()
        inside = flat < big
        for _ in range(32):  # pointer jumping: follow label -> label of that cell
            nxt = flat.copy()
            nxt[inside] = flat[flat[inside]]
            if np.array_equal(nxt, flat):
                break
            flat = nxt
        low = flat.reshape(rows, cols)
        if np.array_equal(low, lab):
            break
        lab = low
    roots, inverse = np.unique(lab[mask], return_inverse=True)  # roots sorted = row-major first cells
    out = np.zeros((rows, cols), dtype=np.int64)
    out[mask] = inverse + 1
    return out, int(roots.size)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a [rows, cols] map, sigma in cells (0: unchanged copy).

    Borders are mirrored (the edge cell repeated: numpy "symmetric", scipy's "reflect"), so a map's total
    is kept up to what the mirror folds back; callers that need shares renormalise.
    """
    v = np.asarray(values, dtype=np.float64)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return v.copy()
    k = _gaussian_kernel(sigma)
    r = k.size // 2
    out = v
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")  # numpy mirrors repeatedly when r > the map's side
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(i, i + n)
            acc += w * p[tuple(sl)]
        out = acc
    return out


def upsample_bilinear(values: np.ndarray, factor: int) -> np.ndarray:
    """[rows, cols] -> [rows * factor, cols * factor]: sub-cell (i, j) samples the map bilinearly at its
    centre, cell values sitting at cell centres (the edge half-cells are constant)."""
    v = np.asarray(values, dtype=np.float64)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return v.copy()

    def coords(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0, n - 1)
        i0 = np.floor(t).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, t - i0

    r0, r1, fr = coords(v.shape[0])
    c0, c1, fc = coords(v.shape[1])
    top = v[r0][:, c0] * (1 - fc) + v[r0][:, c1] * fc
    bottom = v[r1][:, c0] * (1 - fc) + v[r1][:, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]
