"""Lung masks: the classical threshold method, and a registry through which the learned segmenter plugs in.

A lung mask method is any callable ``method(hu, spacing, body) -> labels`` taking a CT volume in HU ``(X, Y, Z)``
(canonical LPS voxel order, see :mod:`chestct.io`), the voxel size in mm and the body mask (or ``None``), and
returning uint8 labels ``(X, Y, Z)``: 0 background, 1 right lung, 2 left lung, in patient coordinates.
``"classical"`` is :func:`classical_lung_mask`; ``"model"`` is :class:`chestct.lungseg_model.ModelLungMask`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from chestct.body import body_mask
from chestct.constants import HU_LUNG_THRESHOLD, LUNG_LEFT, LUNG_RIGHT
from chestct.masks import bounding_box, close_in_plane, disk, fill_holes_in_plane, label_in_plane

__all__ = ["LUNG_MASK_METHODS", "LungMaskMethod", "classical_lung_mask", "get_lung_mask_method", "find_airways"]

LungMaskMethod = Callable[[np.ndarray, Sequence[float], "np.ndarray | None"], np.ndarray]

# Trachea and main bronchi: at most this cross-section (a wide adult trachea is about 25 mm across, 490 mm2).
MAX_AIRWAY_AREA_MM2 = 700.0
MIN_AIRWAY_AREA_MM2 = 20.0
# The trachea enters the scan near the midline: within this fraction of the body width from its centre.
AIRWAY_MIDLINE_FRACTION = 0.15
# ... and lies well inside the body, unlike notches of outside air between the shoulders.
AIRWAY_MIN_DEPTH_MM = 15.0
# Lungs smaller than this fraction of the larger lung are treated as a lung split by the threshold, not a lung.
MIN_LUNG_FRACTION = 0.15
# Air pockets smaller than this are never lung (bowel gas bubbles, noise).
MIN_COMPONENT_ML = 2.0
# In-plane closing radius that brings juxtapleural vessels and the hilum into the mask.
CLOSING_MM = 3.0
# Airways and lung components are found on a grid of about this in-plane spacing (4x fewer voxels at 0.6 mm).
COARSE_GRID_MM = 1.2


def classical_lung_mask(
    hu: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    body: np.ndarray | None = None,
    threshold: float = HU_LUNG_THRESHOLD,
) -> np.ndarray:
    """Lungs as the large air regions inside the body, without trachea and main bronchi, vessels filled in.

    Steps: air below ``threshold`` inside the body; airways tracked down from the trachea and removed
    (:func:`find_airways`); the two largest 3D components kept (split at their narrowest point when the lungs
    touch); in-plane closing and hole filling per lung so vessels and nodules inside count as lung; right and left
    told apart by position (low x is the patient's right in LPS voxel order).

    Dense consolidation and effusion are not air, so this method leaves them out: the learned segmenter exists
    for those scans.

    Args:
        hu: CT volume in HU, ``(X, Y, Z)``, LPS voxel order.
        spacing: voxel size in mm, ``(sx, sy, sz)``.
        body: the body mask (computed when ``None``).
        threshold: HU below which a voxel inside the body is aerated lung.

    Returns:
        uint8 labels ``(X, Y, Z)``: 0 background, 1 right lung, 2 left lung.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {hu.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if body is None:
        body = body_mask(hu, spacing)
    air = (hu < threshold) & body
    # Airways and components are found on a grid of about COARSE_GRID_MM; the outline is drawn at full resolution.
    stride = max(1, int(round(COARSE_GRID_MM / min(spacing[:2]))))
    coarse_spacing = (spacing[0] * stride, spacing[1] * stride, spacing[2])
    coarse_air = air[::stride, ::stride]
    coarse_air &= ~find_airways(coarse_air, body[::stride, ::stride], coarse_spacing)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    radius = int(round(CLOSING_MM / min(spacing[:2])))
    for value, lung in zip((LUNG_RIGHT, LUNG_LEFT), _two_lungs(coarse_air, coarse_spacing)):
        if stride > 1:
            lung = _upsample_in_plane(lung, stride, hu.shape) & air
        labels[_close_and_fill(lung, radius) & (labels == 0) & body] = value
    return labels


def find_airways(air: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Trachea and main bronchi, tracked slice by slice from the top until they open into a lung.

    The trachea is the small air region near the midline in the upper slices. Going down, every slice's air
    region that overlaps the airway of the slice above and stays small belongs to the airway; a region that
    grows past a bronchus' size is lung, and tracking stops there.

    Args:
        air: air inside the body, bool ``(X, Y, Z)``.
        body: body mask, bool ``(X, Y, Z)``.
        spacing: voxel size in mm.

    Returns:
        bool ``(X, Y, Z)`` airway mask (empty when no trachea is found).
    """
    pixel_area = float(spacing[0] * spacing[1])
    labels, count = label_in_plane(air)
    airway = np.zeros(air.shape, dtype=bool)
    if count == 0:
        return airway
    # Slice-by-slice work reads whole axial slices: make them contiguous.
    labels_zxy = np.ascontiguousarray(labels.transpose(2, 0, 1))
    airway_zxy = np.zeros(labels_zxy.shape, dtype=bool)
    areas = np.bincount(labels.ravel()) * pixel_area
    small = (areas >= MIN_AIRWAY_AREA_MM2) & (areas <= MAX_AIRWAY_AREA_MM2)
    small[0] = False
    seed_z, seed_label = _find_trachea(labels, small, body, spacing)
    if seed_label == 0:
        return airway
    airway_zxy[seed_z] = labels_zxy[seed_z] == seed_label
    for z in range(seed_z - 1, -1, -1):  # superior is high z: walk down toward the feet
        touching = np.unique(labels_zxy[z][airway_zxy[z + 1]])
        touching = touching[(touching > 0) & small[touching]]
        if touching.size == 0:
            break
        airway_zxy[z] = np.isin(labels_zxy[z], touching)
    return airway_zxy.transpose(1, 2, 0)


def _find_trachea(labels: np.ndarray, small: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> tuple[int, int]:
    """The highest slice with a trachea-like air region, and that region's label (``(0, 0)`` when none).

    Trachea-like: a small air region near the body's left-right midline and deep inside the body (notches of
    outside air between the shoulders or under clothing are close to the skin).
    """
    depth = labels.shape[2]
    columns = np.flatnonzero(body.any(axis=(1, 2)))
    if columns.size == 0:
        return 0, 0
    centre, width = (columns[0] + columns[-1]) / 2, float(columns[-1] - columns[0])
    for z in range(depth - 1, max(depth - 1 - depth // 3, -1), -1):
        candidates = np.unique(labels[..., z])
        candidates = candidates[(candidates > 0) & small[candidates]]
        if candidates.size == 0:
            continue
        depth_mm = ndimage.distance_transform_edt(body[..., z], sampling=spacing[:2])
        best, best_offset = 0, np.inf
        for label in candidates:
            region = labels[..., z] == label
            offset = abs(np.nonzero(region)[0].mean() - centre)
            if offset <= AIRWAY_MIDLINE_FRACTION * width and depth_mm[region].min() >= AIRWAY_MIN_DEPTH_MM:
                if offset < best_offset:
                    best, best_offset = int(label), offset
        if best:
            return z, best
    return 0, 0


def _two_lungs(air: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung masks from the air inside the body (either may be empty)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, count = ndimage.label(air)
    empty = np.zeros(air.shape, dtype=bool)
    if count == 0:
        return empty, empty
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    largest = labels == order[0]
    if sizes[order[0]] * voxel_ml < MIN_COMPONENT_ML:
        return empty, empty
    second_size = sizes[order[1]] if count > 1 else 0
    if second_size >= MIN_LUNG_FRACTION * sizes[order[0]] and second_size * voxel_ml >= MIN_COMPONENT_ML:
        first, second = largest, labels == order[1]
    else:
        first, second = _split_joined_lungs(largest)
    if _mean_x(second) < _mean_x(first):
        first, second = second, first
    if not second.any():  # a single lung: its side decides which label it gets
        middle = air.shape[0] / 2
        return (first, empty) if _mean_x(first) < middle else (empty, first)
    return first, second


def _split_joined_lungs(lungs: np.ndarray, max_iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Separate two lungs that touch (anterior junction, or a bronchus left in) by eroding until they part.

    The two cores left by the erosion then grow back inside the joined region, one in-plane step at a time, so each
    voxel goes to the core it is closer to along the lung (a watershed without intensities).
    """
    box = bounding_box(lungs)
    empty = np.zeros(lungs.shape, dtype=bool)
    if box is None:
        return lungs, empty
    window = tuple(slice(s, e) for s, e in zip(*box))
    region = lungs[window]
    eroded = region
    for iteration in range(1, max_iterations + 1):
        eroded = ndimage.binary_erosion(eroded, structure=disk(1))
        labels, count = ndimage.label(eroded)
        if count < 2:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] < MIN_LUNG_FRACTION * sizes[first]:
            continue
        owner = np.where(labels == first, 1, np.where(labels == second, 2, 0)).astype(np.uint8)
        for _ in range(4 * iteration + 4):
            grown = ndimage.maximum_filter(owner, size=(3, 3, 1))
            unassigned = region & (owner == 0)
            if not unassigned.any():
                break
            owner[unassigned] = grown[unassigned]
        right, left = empty.copy(), empty.copy()
        right[window], left[window] = owner == 1, owner == 2
        return right, left
    return lungs, empty


def _close_and_fill(lung: np.ndarray, radius: int) -> np.ndarray:
    """In-plane closing and hole filling of one lung, computed inside its bounding box only."""
    box = bounding_box(lung)
    if box is None:
        return lung
    start, end = box
    start[:2] = np.maximum(start[:2] - radius - 1, 0)
    end[:2] = np.minimum(end[:2] + radius + 1, lung.shape[:2])
    window = tuple(slice(s, e) for s, e in zip(start, end))
    result = np.zeros_like(lung)
    result[window] = fill_holes_in_plane(close_in_plane(lung[window], radius))
    return result


def _upsample_in_plane(mask: np.ndarray, stride: int, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse mask, one coarse pixel wider so the full-resolution air decides."""
    wider = ndimage.maximum_filter(mask.view(np.uint8), size=(3, 3, 1))
    return np.repeat(np.repeat(wider, stride, axis=0), stride, axis=1)[: shape[0], : shape[1]].astype(bool)


def _mean_x(mask: np.ndarray) -> float:
    xs = np.nonzero(mask.any(axis=(1, 2)))[0]
    if xs.size == 0:
        return float("inf")
    return float(np.average(np.arange(mask.shape[0]), weights=mask.sum(axis=(1, 2))))


def _classical(**options: Any) -> LungMaskMethod:
    return partial(classical_lung_mask, **options) if options else classical_lung_mask


def _model(**options: Any) -> LungMaskMethod:
    from chestct.lungseg_model import ModelLungMask  # torch.jit only when a model is asked for

    return ModelLungMask(**options)


# Factories by name: each takes the method's options (threshold=..., model_path=..., device=...) and returns it.
LUNG_MASK_METHODS: dict[str, Callable[..., LungMaskMethod]] = {"classical": _classical, "model": _model}


def get_lung_mask_method(method: str | LungMaskMethod, **options: Any) -> LungMaskMethod:
    """A lung mask method by name (``"classical"``, ``"model"`` or one registered in :data:`LUNG_MASK_METHODS`).

    Args:
        method: the name, or a callable ``(hu, spacing, body) -> labels`` returned as it is.
        options: the method's settings, e.g. ``model_path`` and ``device`` for ``"model"``.
    """
    if callable(method):
        return method
    if method not in LUNG_MASK_METHODS:
        raise ValueError(f"unknown lung mask method {method!r}; known: {sorted(LUNG_MASK_METHODS)}.")
    return LUNG_MASK_METHODS[method](**options)
