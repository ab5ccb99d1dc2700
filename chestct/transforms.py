"""MONAI dictionary transforms for chest CT: load in HU, HU window, body crop, lung mask, crop to the lungs.

They expect volumes as loaded by :func:`chestct.io.load_ct`: ``(1, X, Y, Z)`` MetaTensors in HU, LPS voxel order.
Masks are computed from HU, so keep :class:`HUWindowd` after the mask transforms (the window would turn the
-3024 HU scanner padding into air). Crops use MONAI's ``SpatialCrop``, so they update the affine and can be inverted.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRanged, SpatialCrop

from chestct.body import body_mask
from chestct.constants import BODY_CROP_MIN_SIZE, HU_WINDOW_MAX, HU_WINDOW_MIN
from chestct.errors import ChestCTInputError
from chestct.io import load_ct
from chestct.lungmask import LungMaskMethod, get_lung_mask_method
from chestct.masks import bounding_box

__all__ = ["BodyCropd", "CropToLungsd", "HUWindowd", "LoadCTd", "LungMaskd", "spacing_of"]


def spacing_of(image: torch.Tensor) -> tuple[float, float, float]:
    """Voxel size in mm of a ``(C, X, Y, Z)`` image (1 mm when it carries no affine)."""
    if isinstance(image, MetaTensor):
        return tuple(float(s) for s in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0))
    return (1.0, 1.0, 1.0)


def _source_name(image: Any) -> str | None:
    return image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None


def _like(reference: torch.Tensor, array: np.ndarray) -> torch.Tensor:
    """``array`` (X, Y, Z) as a (1, X, Y, Z) tensor carrying ``reference``'s metadata."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
    if isinstance(reference, MetaTensor):
        meta = dict(reference.meta)
        meta["affine"] = reference.affine.clone()
        return MetaTensor(tensor, meta=meta)
    return tensor


class LoadCTd(MapTransform):
    """Load CT scans in HU with :func:`chestct.io.load_ct` (DICOM folder or file, NIfTI, NRRD, MHA).

    Args:
        keys: keys holding paths.
        allow_missing_keys: skip absent keys.
        load_kwargs: passed to :func:`~chestct.io.load_ct` (``series_uid``, ``require_volume``, ``check_hu``...).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **load_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.load_kwargs = load_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_ct(d[key], **self.load_kwargs)
        return d


class HUWindowd(ScaleIntensityRanged):
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to ``[0, 1]`` (both papers' lung window by default).

    Args:
        keys: keys of the images to window.
        hu_min: lower bound of the window in HU (maps to 0).
        hu_max: upper bound of the window in HU (maps to 1).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = HU_WINDOW_MIN,
        hu_max: float = HU_WINDOW_MAX,
        allow_missing_keys: bool = False,
    ) -> None:
        if not hu_max > hu_min:
            raise ValueError(f"hu_max must be greater than hu_min, got hu_min={hu_min}, hu_max={hu_max}.")
        super().__init__(keys, a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True,
                         allow_missing_keys=allow_missing_keys)


class BodyCropd(MapTransform):
    """Crop in-plane to the patient's body: drops the table, the padding and outside air; keeps every slice.

    The body is the largest tissue component, cut from the table (:func:`chestct.body.body_mask`). The in-plane box
    is widened symmetrically to at least ``min_size`` pixels (or the image size, when smaller), as M2UNet requires
    body images of at least 256 x 256. The box is stored as ``meta["body_box"]`` (start, end per axis, in the input
    voxel grid) and the crop is recorded by MONAI, so it can be inverted.

    Args:
        keys: keys to crop (image and any masks on the same grid).
        source_key: key of the HU image the body is found in.
        body_key: where to store the cropped body mask (uint8), or ``None`` to drop it.
        min_size: minimum in-plane size of the box in pixels.
        margin_mm: margin around the body in mm.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str = "image",
        body_key: str | None = "body",
        min_size: int = BODY_CROP_MIN_SIZE,
        margin_mm: float = 5.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}.")
        if margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}.")
        self.source_key, self.body_key, self.min_size, self.margin_mm = source_key, body_key, min_size, margin_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.source_key]
        spacing = spacing_of(image)
        body = body_mask(np.asarray(image[0]), spacing)
        box = bounding_box(body)
        if box is None:
            raise ChestCTInputError(_source_name(image), "no body found: no voxel above the tissue threshold")
        start, end = box
        shape = np.asarray(body.shape)
        margin = np.round(self.margin_mm / np.asarray(spacing)).astype(int)
        start[:2], end[:2] = np.maximum(start[:2] - margin[:2], 0), np.minimum(end[:2] + margin[:2], shape[:2])
        start[2], end[2] = 0, shape[2]
        for axis in range(2):
            start[axis], end[axis] = _widen(start[axis], end[axis], min(self.min_size, shape[axis]), shape[axis])
        cropper = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())
        for key in self.key_iterator(d):
            d[key] = cropper(d[key])
            if isinstance(d[key], MetaTensor):
                d[key].meta["body_box"] = (start.tolist(), end.tolist())
        if self.body_key is not None:
            d[self.body_key] = _like(d[self.source_key], body[tuple(slice(s, e) for s, e in zip(start, end))]
                                     .astype(np.uint8))
        return d


def _widen(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """Grow ``[start, end)`` symmetrically to at least ``size``, shifting it to stay inside ``[0, limit)``."""
    missing = size - (end - start)
    if missing <= 0:
        return int(start), int(end)
    start -= missing // 2
    end += missing - missing // 2
    shift = max(0, -start) - max(0, end - limit)
    return int(start + shift), int(end + shift)


class LungMaskd(MapTransform):
    """Lung labels (0 background, 1 right, 2 left) of a HU image, by a pluggable method.

    Args:
        keys: keys of the HU images.
        output_key: where to write the labels (one key, so ``keys`` must hold a single key).
        method: ``"classical"`` (threshold, see :func:`chestct.lungmask.classical_lung_mask`), ``"model"`` (the
            exported lung segmenter, see :class:`chestct.lungseg_model.ModelLungMask`), another name registered in
            ``chestct.lungmask.LUNG_MASK_METHODS``, or a callable ``(hu, spacing, body) -> labels``.
        method_options: settings of the method (e.g. ``{"model_path": ..., "device": "cuda"}`` for ``"model"``).
        body_key: key of a body mask on the same grid (from :class:`BodyCropd`), or ``None`` to compute it.
        require_lungs: raise :class:`~chestct.errors.ChestCTInputError` when no lung is found.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        output_key: str = "lungs",
        method: str | LungMaskMethod = "classical",
        body_key: str | None = "body",
        require_lungs: bool = True,
        method_options: Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LungMaskd takes one image key, got {self.keys}.")
        self.method = get_lung_mask_method(method, **dict(method_options or {}))
        self.output_key, self.body_key, self.require_lungs = output_key, body_key, require_lungs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            body = None
            if self.body_key is not None and self.body_key in d:
                body = np.asarray(d[self.body_key][0]).astype(bool)
            labels = self.method(np.asarray(image[0]), spacing_of(image), body)
            if self.require_lungs and not labels.any():
                raise ChestCTInputError(_source_name(image), "no lungs found in the scan: is it a chest CT?")
            d[self.output_key] = _like(image, labels.astype(np.uint8))
        return d


class CropToLungsd(MapTransform):
    """Crop every key to the lungs' 3D bounding box plus a margin in mm.

    Args:
        keys: keys to crop (image, lung mask, other masks on the same grid).
        lung_key: key of the lung labels (any value > 0 is lung).
        margin_mm: margin around the lungs in mm, per axis.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lung_key: str = "lungs",
        margin_mm: float | Sequence[float] = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        margins = np.broadcast_to(np.asarray(margin_mm, dtype=float), (3,))
        if np.any(margins < 0):
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}.")
        self.lung_key, self.margin_mm = lung_key, margins

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lungs = d[self.lung_key]
        box = bounding_box(np.asarray(lungs[0]) > 0)
        if box is None:
            raise ChestCTInputError(_source_name(lungs), "the lung mask is empty: nothing to crop to")
        margin = np.round(self.margin_mm / np.asarray(spacing_of(lungs))).astype(int)
        shape = np.asarray(lungs.shape[1:])
        start, end = np.maximum(box[0] - margin, 0), np.minimum(box[1] + margin, shape)
        cropper = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())
        for key in self.key_iterator(d):
            d[key] = cropper(d[key])
        return d
