"""Bags of instances for multiple instance learning on chest CT: axial slices or lung patches, sampling, collation.

A scan becomes a bag ``(N, 1, S, S)`` of instances (axial slices, or 2D lung patches) resized to ``S x S`` (256 in
DA-CMIL). The transforms expect the output of the shared preprocessing, cropped to the lungs and windowed:
``image`` ``(1, X, Y, Z)`` in ``[0, 1]`` and ``lungs`` ``(1, X, Y, Z)`` labels (> 0 is lung), LPS voxel order (axis 2
is axial, see :mod:`chestct.io`).

Every bag keeps where its instances come from, so attention can be mapped back to the scan:

- ``slice_indices`` ``(N,)``: the axial index ``z`` of each instance in the cropped volume;
- ``patch_boxes`` ``(N, 4)`` (patch bags only): ``(x0, y0, x1, y1)`` of each patch in its slice;
- ``geometry`` (see :class:`RecordGeometryd`): the loaded volume's shape and affines plus ``crop_start`` /
  ``crop_shape`` of the cropped volume inside it, so maps can be written on the input scan's grid.

Preprocessing is split as in the bundles (DESIGN.md convention 3): the deterministic part (load, crop, mask,
window, bag) is cached by a MONAI ``PersistentDataset`` or ``CacheDataset``; the random part
(:class:`RandomInstanceSampled`, flips) runs every epoch. :func:`collate_bags` pads bags of different sizes and
returns the mask ``(B, N)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from chestct.errors import ChestCTInputError
from custom_nets.checks import check_in_range, check_positive_int

__all__ = [
    "BAG_MASK_KEY",
    "GEOMETRY_KEY",
    "PATCH_BOXES_KEY",
    "SLICE_INDICES_KEY",
    "LungPatchBagd",
    "RandBagFlipd",
    "RandomInstanceSampled",
    "RecordGeometryd",
    "SafeTransform",
    "SliceBagd",
    "collate_bags",
    "error_reason",
    "list_scans",
    "load_datalist",
]

SLICE_INDICES_KEY = "slice_indices"
PATCH_BOXES_KEY = "patch_boxes"
GEOMETRY_KEY = "geometry"
BAG_MASK_KEY = "mask"
# Default share of the largest slice's lung area a slice needs to enter a bag (drops the lung apices and bases,
# whose few lung pixels are mostly partial volume).
DEFAULT_MIN_LUNG_FRACTION = 0.1
# DA-CMIL's patch variant: 128 x 128 patches showing at least 30 % lung tissue.
DEFAULT_PATCH_SIZE = 128
DEFAULT_PATCH_MIN_LUNG = 0.3
SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(M, 1, h, w)`` images to ``(M, 1, size, size)`` (float32)."""
    images = images.float()
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _source_name(data: Mapping[Hashable, Any], key: Hashable) -> str | None:
    value = data.get(key)
    if isinstance(value, MetaTensor):
        return value.meta.get("filename_or_obj")
    return None


def _update_geometry(d: dict[Hashable, Any], image: torch.Tensor, geometry_key: str) -> None:
    """Store where the cropped ``image`` lies in the loaded volume (from the two affines) in ``d[geometry_key]``."""
    geometry = d.get(geometry_key)
    if not isinstance(geometry, dict) or not isinstance(image, MetaTensor):
        return
    geometry = dict(geometry)
    input_affine = np.asarray(geometry["input_affine"], dtype=float)
    crop_affine = np.asarray(image.affine, dtype=float)
    start = np.linalg.solve(input_affine, crop_affine[:, 3])[:3]
    geometry["crop_start"] = [int(v) for v in np.round(start)]
    geometry["crop_shape"] = [int(s) for s in image.shape[1:]]
    d[geometry_key] = geometry


class RecordGeometryd(MapTransform):
    """Remember the loaded volume's grid, to write maps on the input scan's grid after cropping.

    Put it right after loading. ``d[geometry_key]`` becomes ``{"input_shape", "input_affine", "original_affine",
    "filename"}`` (lists and numbers, cheap to cache); the bag transforms add ``crop_start`` and
    ``crop_shape``.

    Args:
        keys: the image key (one key).
        geometry_key: where to store the geometry.
    """

    def __init__(self, keys: KeysCollection = "image", geometry_key: str = GEOMETRY_KEY) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"RecordGeometryd takes one image key, got {self.keys}.")
        self.geometry_key = geometry_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.keys[0]]
        affine = np.asarray(image.affine, dtype=float) if isinstance(image, MetaTensor) else np.eye(4)
        meta = image.meta if isinstance(image, MetaTensor) else {}
        # Plain lists and numbers: cached items must load with ``torch.load(weights_only=True)``.
        d[self.geometry_key] = {
            "input_shape": [int(s) for s in image.shape[1:]],
            "input_affine": affine.tolist(),
            "original_affine": np.asarray(meta.get("original_affine", affine), dtype=float).tolist(),
            "filename": str(meta.get("filename_or_obj", "")),
        }
        return d


class SliceBagd(MapTransform):
    """Turn a cropped, windowed volume into a bag of axial slices ``(N, 1, S, S)``.

    A slice enters the bag when its lung area is at least ``min_lung_fraction`` times the largest slice's lung area
    (``0`` keeps every slice with any lung pixel; slices with no lung never enter). Each kept slice (the whole
    in-plane extent of the crop, i.e. the lung bounding box with its margin) is resized to ``S x S`` without keeping
    the aspect ratio, as in the paper (512 x 512 slices resized to 256 x 256). The kept slice indices are stored in
    ``d[SLICE_INDICES_KEY]`` (int64 ``(N,)``, increasing); the image key is replaced by the bag (a plain float32
    tensor); the lung key is replaced by the per-slice lung fractions of the kept slices when ``keep_lungs`` is
    false (default), so caches stay small.

    Args:
        keys: the image key (one key).
        lung_key: key of the lung labels on the same grid.
        spatial_size: output size ``S`` of each slice.
        min_lung_fraction: minimum lung area, as a fraction of the largest slice's lung area, in ``[0, 1]``.
        max_instances: keep at most this many slices (evenly spaced over the kept ones); ``None`` for all.
        keep_lungs: keep the lung labels as a ``(N, 1, S, S)`` bag of resized masks instead of dropping them.
        geometry_key: key of the :class:`RecordGeometryd` record to complete with the crop position.

    Raises:
        ValueError: on a bad argument.
        ChestCTInputError: when the lung mask is empty.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        lung_key: str = "lungs",
        spatial_size: int = 256,
        min_lung_fraction: float = DEFAULT_MIN_LUNG_FRACTION,
        max_instances: int | None = None,
        keep_lungs: bool = False,
        geometry_key: str = GEOMETRY_KEY,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SliceBagd takes one image key, got {self.keys}.")
        self.lung_key = lung_key
        self.spatial_size = check_positive_int("spatial_size", spatial_size)
        self.min_lung_fraction = check_in_range("min_lung_fraction", min_lung_fraction, 0.0, 1.0)
        self.max_instances = None if max_instances is None else check_positive_int("max_instances", max_instances)
        self.keep_lungs = keep_lungs
        self.geometry_key = geometry_key

    def select_slices(self, lungs: np.ndarray) -> np.ndarray:
        """Indices of the slices of ``lungs`` ``(X, Y, Z)`` that enter the bag."""
        area = (lungs > 0).sum(axis=(0, 1))
        if area.max() == 0:
            return np.zeros(0, dtype=np.int64)
        keep = np.flatnonzero((area > 0) & (area >= self.min_lung_fraction * area.max()))
        if self.max_instances is not None and keep.size > self.max_instances:
            keep = keep[np.unique(np.linspace(0, keep.size - 1, self.max_instances).round().astype(int))]
        return keep.astype(np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        image, lungs = d[key], d[self.lung_key]
        if tuple(image.shape) != tuple(lungs.shape) or image.dim() != 4:
            raise ValueError(f"image {tuple(image.shape)} and lungs {tuple(lungs.shape)} must be (1, X, Y, Z) alike.")
        lung_np = np.asarray(lungs[0])
        keep = self.select_slices(lung_np)
        if keep.size == 0:
            raise ChestCTInputError(_source_name(d, key), "the lung mask is empty: no slice to put in the bag")
        _update_geometry(d, image, self.geometry_key)
        volume = torch.as_tensor(image[0]).float()  # (X, Y, Z), plain tensor
        slices = volume[:, :, torch.from_numpy(keep)].permute(2, 0, 1).unsqueeze(1)  # (N, 1, X, Y)
        d[key] = _resize(slices, self.spatial_size)
        d[SLICE_INDICES_KEY] = torch.from_numpy(keep)
        area = (lung_np > 0).sum(axis=(0, 1)).astype(np.float32)
        d["lung_area_fraction"] = torch.from_numpy(area[keep] / max(float(area.max()), 1.0))
        if self.keep_lungs:
            masks = torch.from_numpy(lung_np[:, :, keep] > 0).permute(2, 0, 1).unsqueeze(1).float()
            d[self.lung_key] = (_resize(masks, self.spatial_size) > 0.5).to(torch.uint8)
        else:
            d.pop(self.lung_key, None)
        return d


class LungPatchBagd(MapTransform):
    """Turn a cropped, windowed volume into a bag of 2D lung patches ``(N, 1, S, S)`` (DA-CMIL's patch variant).

    Every axial slice with lung is tiled with ``patch_size x patch_size`` patches on a regular grid of step
    ``stride`` that covers the slice (the last row and column are shifted inwards to end at the border; a slice
    smaller than a patch is zero-padded). A patch is kept when at least ``min_lung_fraction`` of its pixels are lung
    (the paper: 128 x 128 patches with >= 30 % lung), then resized to ``S x S`` (256 in the paper).
    ``d[SLICE_INDICES_KEY]`` holds each patch's slice index and ``d[PATCH_BOXES_KEY]`` its ``(x0, y0, x1, y1)``
    in the slice (int64 ``(N, 4)``), ``d["lung_area_fraction"]`` its lung fraction.

    Args:
        keys: the image key (one key).
        lung_key: key of the lung labels on the same grid.
        patch_size: patch size in pixels of the cropped volume.
        stride: grid step in pixels (``None``: ``patch_size``, i.e. no overlap).
        spatial_size: output size ``S`` of each patch.
        min_lung_fraction: minimum lung fraction of a patch, in ``[0, 1]``.
        max_instances: keep at most this many patches (evenly spaced); ``None`` for all.
        geometry_key: key of the :class:`RecordGeometryd` record to complete with the crop position.

    Raises:
        ValueError: on a bad argument.
        ChestCTInputError: when no patch has enough lung.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        lung_key: str = "lungs",
        patch_size: int = DEFAULT_PATCH_SIZE,
        stride: int | None = None,
        spatial_size: int = 256,
        min_lung_fraction: float = DEFAULT_PATCH_MIN_LUNG,
        max_instances: int | None = None,
        geometry_key: str = GEOMETRY_KEY,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"LungPatchBagd takes one image key, got {self.keys}.")
        self.lung_key = lung_key
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.stride = self.patch_size if stride is None else check_positive_int("stride", stride)
        self.spatial_size = check_positive_int("spatial_size", spatial_size)
        self.min_lung_fraction = check_in_range("min_lung_fraction", min_lung_fraction, 0.0, 1.0)
        self.max_instances = None if max_instances is None else check_positive_int("max_instances", max_instances)
        self.geometry_key = geometry_key

    def _starts(self, length: int) -> list[int]:
        if length <= self.patch_size:
            return [0]
        starts = list(range(0, length - self.patch_size + 1, self.stride))
        if starts[-1] + self.patch_size < length:
            starts.append(length - self.patch_size)
        return starts

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        image, lungs = d[key], d[self.lung_key]
        if tuple(image.shape) != tuple(lungs.shape) or image.dim() != 4:
            raise ValueError(f"image {tuple(image.shape)} and lungs {tuple(lungs.shape)} must be (1, X, Y, Z) alike.")
        _update_geometry(d, image, self.geometry_key)
        volume = torch.as_tensor(image[0]).float()
        lung = torch.as_tensor(np.asarray(lungs[0]) > 0)
        p = self.patch_size
        size_x, size_y, depth = volume.shape
        pad_x, pad_y = max(0, p - size_x), max(0, p - size_y)
        if pad_x or pad_y:  # zero-pad (x, y) of small slices up to one patch
            volume = F.pad(volume.permute(2, 0, 1), (0, pad_y, 0, pad_x)).permute(1, 2, 0)
            lung = F.pad(lung.permute(2, 0, 1), (0, pad_y, 0, pad_x)).permute(1, 2, 0)
        xs, ys = self._starts(volume.shape[0]), self._starts(volume.shape[1])
        patches, z_index, boxes, fractions = [], [], [], []
        for z in torch.nonzero(lung.any(dim=0).any(dim=0)).flatten().tolist():
            for x0 in xs:
                for y0 in ys:
                    frac = float(lung[x0 : x0 + p, y0 : y0 + p, z].float().mean())
                    if frac >= self.min_lung_fraction and frac > 0:
                        patches.append(volume[x0 : x0 + p, y0 : y0 + p, z])
                        z_index.append(z)
                        boxes.append((x0, y0, min(x0 + p, size_x), min(y0 + p, size_y)))
                        fractions.append(frac)
        if not patches:
            raise ChestCTInputError(
                _source_name(d, key), f"no {p}x{p} patch has at least {self.min_lung_fraction:.0%} lung"
            )
        keep = np.arange(len(patches))
        if self.max_instances is not None and keep.size > self.max_instances:
            keep = np.unique(np.linspace(0, keep.size - 1, self.max_instances).round().astype(int))
        stack = torch.stack([patches[i] for i in keep]).unsqueeze(1)
        d[key] = _resize(stack, self.spatial_size)
        d[SLICE_INDICES_KEY] = torch.tensor([z_index[i] for i in keep], dtype=torch.int64)
        d[PATCH_BOXES_KEY] = torch.tensor([boxes[i] for i in keep], dtype=torch.int64)
        d["lung_area_fraction"] = torch.tensor([fractions[i] for i in keep], dtype=torch.float32)
        d.pop(self.lung_key, None)
        return d


# Per-instance keys that follow the instances when a bag is sampled or collated.
INSTANCE_KEYS = (SLICE_INDICES_KEY, PATCH_BOXES_KEY, "lung_area_fraction")


class RandomInstanceSampled(Randomizable, MapTransform):
    """Sample ``k`` instances of a bag at random (training): without replacement when the bag has at least ``k``
    instances, with replacement otherwise, so every training bag has exactly ``k`` instances. The sampled
    instances keep the bag's order; the per-instance keys (``slice_indices``, ``patch_boxes``,
    ``lung_area_fraction``) follow them.

    Args:
        keys: the bag key(s) ``(N, ...)``, all sampled with the same indices.
        num_instances: ``k`` (32 in the paper).
        instance_keys: other per-instance keys to index the same way (absent ones are skipped).

    Raises:
        ValueError: when ``num_instances`` is not a positive integer.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_instances: int = 32,
        instance_keys: Sequence[str] = INSTANCE_KEYS,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.num_instances = check_positive_int("num_instances", num_instances)
        self.instance_keys = tuple(instance_keys)
        self._index: np.ndarray | None = None

    def randomize(self, data: int) -> None:
        n, k = int(data), self.num_instances
        if n >= k:
            self._index = np.sort(self.R.choice(n, size=k, replace=False))
        else:
            self._index = np.sort(self.R.choice(n, size=k, replace=True))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        n = int(d[self.keys[0]].shape[0])
        self.randomize(n)
        index = torch.from_numpy(self._index)
        for key in list(self.keys) + [k for k in self.instance_keys if k in d]:
            value = d[key]
            if not isinstance(value, torch.Tensor) or value.shape[0] != n:
                raise ValueError(f"{key!r} must have the bag's {n} instances on its first axis.")
            d[key] = value[index]
        return d


class RandBagFlipd(Randomizable, MapTransform):
    """Random flips of the instances of a bag ``(N, C, H, W)`` along each in-plane axis with probability ``prob``.

    ``per_instance=False`` (default) flips the whole bag the same way (a mirrored patient); ``True`` draws a flip
    per instance.

    Args:
        keys: bag keys.
        prob: probability of a flip along each axis.
        spatial_axis: in-plane axes to flip, ``0`` (H) and/or ``1`` (W).
        per_instance: draw the flips per instance.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        spatial_axis: Sequence[int] = (0, 1),
        per_instance: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.prob = check_in_range("prob", prob, 0.0, 1.0)
        if any(a not in (0, 1) for a in spatial_axis):
            raise ValueError(f"spatial_axis must hold 0 and/or 1, got {spatial_axis!r}.")
        self.spatial_axis = tuple(spatial_axis)
        self.per_instance = per_instance

    def randomize(self, data: int) -> np.ndarray:
        return self.R.random_sample((int(data), len(self.spatial_axis))) < self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        n = int(d[self.keys[0]].shape[0])
        draws = self.randomize(n if self.per_instance else 1)
        for key in self.keys:
            bag = torch.as_tensor(d[key])
            if self.per_instance:
                bag = bag.clone()
                for i in range(n):
                    dims = [2 + a for a, flip in zip(self.spatial_axis, draws[i]) if flip]
                    if dims:
                        bag[i] = bag[i].flip(dims=[dim - 1 for dim in dims])
            else:
                dims = [2 + a for a, flip in zip(self.spatial_axis, draws[0]) if flip]
                if dims:
                    bag = bag.flip(dims=dims)
            d[key] = bag
        return d


def collate_bags(
    batch: Sequence[Mapping[Hashable, Any]],
    bag_keys: Sequence[str] = ("image",),
    instance_keys: Sequence[str] = INSTANCE_KEYS,
    mask_key: str = BAG_MASK_KEY,
) -> dict[Hashable, Any]:
    """Collate bags of different sizes: pad to the largest bag and add the bool mask ``(B, N)``.

    Bag keys ``(N_b, ...)`` become ``(B, N, ...)`` padded with zeros; per-instance keys are padded with ``-1``
    (indices) or ``0`` (fractions); numbers and 0-d tensors are stacked (labels become ``(B,)``); anything else
    (paths, names, geometry dicts, error reasons) becomes a list. A list ``[[...]]`` (MONAI's multi-sample
    output) is flattened first.

    Args:
        batch: items from the dataset.
        bag_keys: keys of the padded bags.
        instance_keys: per-instance keys padded alongside.
        mask_key: key of the output mask.

    Returns:
        a dict; ``mask`` is ``True`` for real instances.
    """
    items: list[Mapping[Hashable, Any]] = []
    for item in batch:
        items.extend(item if isinstance(item, (list, tuple)) else [item])
    if not items:
        raise ValueError("cannot collate an empty batch.")
    present_bags = [k for k in bag_keys if all(isinstance(it.get(k), torch.Tensor) for it in items)]
    sizes = [int(items[0][present_bags[0]].shape[0]) if present_bags else 0]
    if present_bags:
        sizes = [int(it[present_bags[0]].shape[0]) for it in items]
    n_max = max(sizes)
    out: dict[Hashable, Any] = {}
    if present_bags:
        mask = torch.zeros((len(items), n_max), dtype=torch.bool)
        for i, n in enumerate(sizes):
            mask[i, :n] = True
        out[mask_key] = mask
    keys = list(dict.fromkeys(k for it in items for k in it))
    for key in keys:
        values = [it.get(key) for it in items]
        if key in present_bags or (key in instance_keys and present_bags and
                                   all(isinstance(v, torch.Tensor) for v in values)):
            first = torch.as_tensor(values[0])
            fill = -1 if key in instance_keys and not first.is_floating_point() else 0
            padded = torch.full((len(items), n_max, *first.shape[1:]), fill, dtype=first.dtype)
            for i, v in enumerate(values):
                v = torch.as_tensor(v)
                padded[i, : v.shape[0]] = v
            out[key] = padded
        elif all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
            out[key] = torch.as_tensor(np.asarray(values))
        elif all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
            out[key] = torch.stack([torch.as_tensor(v).reshape(()) for v in values])
        else:
            out[key] = values
    return out


def error_reason(error: BaseException) -> str:
    """The most useful message of an exception chain (MONAI wraps transform errors in ``RuntimeError``)."""
    current: BaseException | None = error
    last = error
    while current is not None:
        if isinstance(current, ChestCTInputError):
            return current.reason
        last = current
        current = current.__cause__ or current.__context__
    return f"{type(last).__name__}: {last}"


class SafeTransform:
    """Run a transform and turn a failure into an item that says why, so one bad scan does not stop a cohort.

    On failure the item keeps its non-image keys and gets ``error`` (the reason) and ``image = None``; inference
    code writes the reason in its report and moves on. Use it for inference only: training should fail loudly.

    Args:
        transform: the transform (e.g. a MONAI ``Compose``).
        image_key: key set to ``None`` on failure.
        error_key: key of the reason.
    """

    def __init__(self, transform: Callable, image_key: str = "image", error_key: str = "error") -> None:
        self.transform, self.image_key, self.error_key = transform, image_key, error_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        try:
            return self.transform(data)
        except Exception as error:  # noqa: BLE001 - any failure of one scan is reported, not raised
            d = {k: v for k, v in dict(data).items() if isinstance(v, (str, int, float))}
            d[self.image_key] = None
            d[self.error_key] = error_reason(error)
            return d


def _scan_id(path: Path) -> str:
    name = path.name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_scans(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The scans of an inference folder: each NIfTI/NRRD/MHA file or sub-folder (a DICOM series) directly inside
    is one scan; a ``datalist.json`` (or a path to any datalist JSON) lists the scans instead.

    Returns:
        ``[{"image": absolute path, "case_id": name}, ...]`` sorted by name (datalist order for a datalist), with
        ``label`` when the datalist has one.

    Raises:
        ChestCTInputError: when the folder does not exist or holds no scan.
    """
    root = Path(dataset_dir)
    if root.is_file() and root.suffix == ".json":
        keep = ("image", "case_id", "label", "source")
        return [{k: v for k, v in e.items() if k in keep} for e in load_datalist(root)]
    if not root.is_dir():
        raise ChestCTInputError(root, "no such folder (expected a folder of scans or a datalist JSON)")
    if (root / "datalist.json").is_file():
        return list_scans(root / "datalist.json")
    scans = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or any(path.name.lower().endswith(s) for s in SCAN_SUFFIXES):
            scans.append({"image": str(path.resolve()), "case_id": _scan_id(path), "source": str(path.resolve())})
    if not scans:
        raise ChestCTInputError(root, f"no scan found (expected DICOM folders or {', '.join(SCAN_SUFFIXES)} files)")
    return scans


def load_datalist(
    datalist: str | os.PathLike,
    section: str = "training",
    exclude_folds: Sequence[int] = (),
    folds: Sequence[int] | None = None,
    keys: Sequence[str] = ("image", "label"),
) -> list[dict[str, Any]]:
    """Cases of a decathlon-style datalist with absolute paths, selected by section and fold.

    With a ``fold`` key per case, ``folds`` keeps those folds and ``exclude_folds`` drops others (e.g. training =
    every fold but the validation and test folds). Without folds, ``section`` (``"training"``, ``"validation"``,
    ``"test"``) picks the list. Each case keeps ``keys`` plus ``case_id`` (its file name without extension).

    Raises:
        ChestCTInputError: when the file is missing or the selection is empty.
    """
    path = Path(datalist)
    if not path.is_file():
        raise ChestCTInputError(path, "datalist not found")
    content = json.loads(path.read_text())
    base = path.parent
    entries = content.get(section)
    has_folds = any("fold" in e for e in content.get("training", []))
    if has_folds and (folds is not None or exclude_folds):
        entries = content.get("training", [])
    if entries is None:
        raise ChestCTInputError(path, f"no {section!r} list in the datalist")
    cases = []
    for entry in entries:
        fold = entry.get("fold")
        if has_folds and folds is not None and fold not in list(folds):
            continue
        if fold is not None and fold in list(exclude_folds):
            continue
        case = {k: entry[k] for k in keys if k in entry}
        image = Path(entry["image"])
        case["image"] = str(image if image.is_absolute() else (base / image).resolve())
        case["case_id"] = _scan_id(image)
        case["source"] = case["image"]
        if "label" in case:
            case["label"] = int(case["label"])
        cases.append(case)
    if not cases:
        raise ChestCTInputError(path, f"no case selected (section {section!r}, folds {folds}, "
                                      f"excluded {list(exclude_folds)})")
    return cases
