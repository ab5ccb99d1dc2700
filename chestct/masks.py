"""Binary-mask helpers shared by the body and lung masks: in-plane morphology, components, bounding boxes.

Arrays are ``(X, Y, Z)`` with Z the axial axis; "in-plane" operations act on each axial slice separately.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "bounding_box",
    "close_in_plane",
    "disk",
    "fill_holes_in_plane",
    "keep_largest_component",
    "label_in_plane",
    "open_in_plane",
]

# 2D connectivity inside each axial slice and none across slices.
IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_4[1, :, 1] = IN_PLANE_4[:, 1, 1] = True
IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_8[:, :, 1] = True


def disk(radius: int) -> np.ndarray:
    """A flat in-plane disk structuring element of shape ``(2r+1, 2r+1, 1)``."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    grid = np.arange(-radius, radius + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2)[..., None]


def fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice: a hole is background that does not reach the slice border in-plane."""
    # One labelling pass of the background beats scipy's iterative flood fill on 512x512xN volumes.
    background, count = ndimage.label(~mask.astype(bool), structure=IN_PLANE_4)
    if count == 0:
        return mask.astype(bool)
    border = np.concatenate(
        [background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(), background[:, -1].ravel()]
    )
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = False
    return ~outside[background]


def open_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """In-plane morphological opening with a square of side ``2 * radius + 1`` (removes bridges thinner than it)."""
    if radius <= 0:
        return mask.astype(bool)
    size = (2 * radius + 1, 2 * radius + 1, 1)
    # Running min/max filters cost the same for any radius, unlike a disk-shaped binary erosion.
    eroded = ndimage.minimum_filter(mask.astype(np.uint8), size=size, mode="constant", cval=0)
    return ndimage.maximum_filter(eroded, size=size, mode="constant", cval=0).astype(bool)


def close_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """In-plane morphological closing with a square of side ``2 * radius + 1`` (fills gaps narrower than it)."""
    if radius <= 0:
        return mask.astype(bool)
    size = (2 * radius + 1, 2 * radius + 1, 1)
    # A margin as wide as the radius lets the dilation spill over the border and the erosion take it back.
    padded = np.pad(mask.astype(np.uint8), ((radius, radius), (radius, radius), (0, 0)))
    dilated = ndimage.maximum_filter(padded, size=size, mode="constant", cval=0)
    closed = ndimage.minimum_filter(dilated, size=size, mode="constant", cval=0)
    return closed[radius:-radius, radius:-radius].astype(bool)


def label_in_plane(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 2D connected components of every axial slice with one numbering for the whole volume."""
    return ndimage.label(mask, structure=IN_PLANE_8)


def keep_largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (all False when the mask is empty)."""
    labels, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive-exclusive box ``(start, end)`` of the True voxels per axis, or ``None`` for an empty mask."""
    starts, ends = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        starts.append(hits[0])
        ends.append(hits[-1] + 1)
    return np.asarray(starts), np.asarray(ends)
