"""Finding the patient's body in a CT volume: tissue threshold, cut from the table, largest component, holes filled."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from chestct.constants import HU_BODY_THRESHOLD
from chestct.masks import fill_holes_in_plane, keep_largest_component, open_in_plane

__all__ = ["body_mask"]

# Radius of the in-plane opening that cuts thin bridges between the body and the table or cushions.
TABLE_CUT_MM = 4.0
# The body's outline is found on a grid of about this in-plane spacing, then refined at full resolution.
COARSE_GRID_MM = 2.0


def body_mask(
    hu: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    threshold: float = HU_BODY_THRESHOLD,
    table_cut_mm: float = TABLE_CUT_MM,
) -> np.ndarray:
    """The body of a CT volume, holes (lungs, airways, bowel gas) filled, table and padding excluded.

    Scanner padding (-3024 or -2048 HU outside the reconstruction circle) lies below any tissue threshold, so it
    never counts as body, and air inside the body is filled in afterwards.

    Args:
        hu: CT volume in HU, shape ``(X, Y, Z)``, Z axial.
        spacing: voxel size in mm, ``(sx, sy, sz)``.
        threshold: HU above which a voxel is tissue (fat is about -100 HU, lung about -850 HU).
        table_cut_mm: radius of the in-plane opening that separates the table from the body.

    Returns:
        bool array ``(X, Y, Z)``.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {hu.shape}.")
    tissue = hu > threshold
    pixel_mm = max(float(min(spacing[:2])), 1e-6)
    stride = max(1, int(COARSE_GRID_MM // pixel_mm))
    coarse = open_in_plane(tissue[::stride, ::stride], int(round(table_cut_mm / (pixel_mm * stride))))
    coarse = keep_largest_component(coarse)
    if stride > 1:
        # Back to full resolution, one coarse pixel wider, so the threshold at full resolution draws the outline.
        coarse = ndimage.maximum_filter(coarse.view(np.uint8), size=(3, 3, 1)).astype(bool)
        coarse = np.repeat(np.repeat(coarse, stride, axis=0), stride, axis=1)[: hu.shape[0], : hu.shape[1]]
        tissue &= coarse
    else:
        tissue = coarse
    return fill_holes_in_plane(tissue)
