"""The 2D training set of the lung segmenter: axial slices and right/left lung labels from phantoms and real CT.

Every slice is prepared exactly as :class:`chestct.lungseg_model.ModelLungMask` prepares its input (``hu[:, :, z]``
of the canonical LPS volume, HU clipped to :data:`LUNGSEG_HU_WINDOW` and scaled to [0, 1], bilinear resize to
``LUNGSEG_IMAGE_SIZE``); labels (0 background, 1 right lung, 2 left lung) are resized with nearest neighbour.
Each slice is written as two ``.npy`` files (image float16, label uint8, both ``(S, S)``) and listed in a
decathlon-style ``datalist.json`` (``training`` / ``validation``, each item ``image``, ``label``, ``source``).

Sources (see the lung segmentation bundle's README for the reasoning):

- ``phantom``: synthetic chest CTs with pathology (lobar consolidation, severe ground glass, pleural effusion;
  random field of view, slice thickness, noise, in-plane size); the truth includes lesions and effusion.
- ``totalsegmentator``: ``example_ct_sm.nii.gz`` with ``example_seg.nii.gz`` lobes merged into lungs.
- ``cip_crop``: ``crop_ct_2slices.nrrd`` with ``derived_crop_ct_2slices_lobes.nrrd`` lobes merged into lungs.
- ``classical``: the classical mask on ``covid_ct_md/normal001``, ``dcmqi_ct3slice`` and the axial
  ``ny_sbu_slices``, kept only on slices where it is reliable (:func:`reliable_slices`).

Held-out evaluation data is never read: ``cip/ct-64*`` (NRRD and DICOM), everything from the same COPDGene patient
(the 10002K mask, ``lm-64``, ``wholeLung-64``, the partial label map of ct-64) and ``lungmask_slices``
(:func:`is_held_out`). Sources are weighted by how many times their slices are repeated in the training list.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_hausdorff_distance
from monai.transforms import MapTransform, RandomizableTransform

from chestct.body import body_mask
from chestct.errors import ChestCTInputError
from chestct.io import load_ct
from chestct.lungmask import classical_lung_mask
from chestct.lungseg_model import LUNGSEG_HU_WINDOW, LUNGSEG_IMAGE_SIZE, ModelLungMask
from chestct.paths import real_data_dir
from chestct.phantoms import make_phantom
from chestct.writers import save_nifti_like_input, write_json

__all__ = [
    "HELD_OUT_TOKENS",
    "LungSlices",
    "NetworkLungMask",
    "RandLungFlipd",
    "RandResolutiond",
    "build_dataset",
    "evaluate_volumes",
    "is_held_out",
    "lobes_to_lungs",
    "lung_metrics",
    "phantom_volumes",
    "prepare_slices",
    "real_volumes",
    "reliable_slices",
    "segment_scans",
]

# Any path containing one of these (case-insensitive) is held-out evaluation data and is never read for training:
# the COPDGene ct-64 scan (NRRD and DICOM) and every file derived from the same patient, and the lungmask slices.
HELD_OUT_TOKENS: tuple[str, ...] = ("ct-64", "10002k", "lm-64", "wholelung-64", "lungmask_slices")

# CIP lobe codes (4 RUL, 5 RML, 6 RLL | 7 LUL, 8 LLL) and TotalSegmentator v2 lung lobe ids.
CIP_RIGHT_LOBES: tuple[int, ...] = (4, 5, 6)
CIP_LEFT_LOBES: tuple[int, ...] = (7, 8)
TOTALSEG_RIGHT_LOBES: tuple[int, ...] = (12, 13, 14)
TOTALSEG_LEFT_LOBES: tuple[int, ...] = (10, 11)

# Reliability of a classical mask on one slice: each lung at least this area, the two lungs' area ratio within
# bounds, the lung mask's Dice with each neighbouring slice at least this (volumes only), and not in the top or
# bottom share of the lungs' axial extent (apex and base, where partial volume and the diaphragm dome mislead).
MIN_LUNG_AREA_MM2: float = 600.0
MAX_LUNG_AREA_RATIO: float = 3.0
MIN_NEIGHBOUR_DICE: float = 0.85
APEX_BASE_FRACTION: float = 0.12

# Times each slice appears in the training list, per source (a source's weight in the loss).
SOURCE_REPEATS: dict[str, int] = {"phantom": 1, "totalsegmentator": 4, "cip_crop": 8, "classical": 3}


@dataclass
class LungSlices:
    """Axial slices of one volume with their lung labels, before resizing.

    Attributes:
        name: identifier used in file names (letters, digits, ``_``).
        source: one of the keys of :data:`SOURCE_REPEATS`.
        hu: ``(X, Y, Z)`` HU volume in LPS voxel order.
        labels: ``(X, Y, Z)`` uint8, 0 background, 1 right lung, 2 left lung.
        keep: indices ``z`` of the slices to use.
    """

    name: str
    source: str
    hu: np.ndarray
    labels: np.ndarray
    keep: Sequence[int]


def is_held_out(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or is derived from) held-out evaluation data."""
    text = str(path).lower()
    return any(token in text for token in HELD_OUT_TOKENS)


def _load(path: Path, **kwargs: Any):
    if is_held_out(path):
        raise ValueError(f"refusing to read held-out evaluation data for training: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_ct(path, **kwargs)


def lobes_to_lungs(lobes: np.ndarray, right: Sequence[int], left: Sequence[int]) -> np.ndarray:
    """Merge lobe codes into lung labels (1 right, 2 left); every other value becomes background."""
    labels = np.zeros(lobes.shape, dtype=np.uint8)
    labels[np.isin(lobes, right)] = 1
    labels[np.isin(lobes, left)] = 2
    return labels


def prepare_slices(hu: np.ndarray, labels: np.ndarray | None = None, size: int = LUNGSEG_IMAGE_SIZE,
                   hu_window: Sequence[float] = LUNGSEG_HU_WINDOW) -> tuple[np.ndarray, np.ndarray | None]:
    """The model input of every axial slice, as :class:`~chestct.lungseg_model.ModelLungMask` computes it.

    Args:
        hu: ``(X, Y, Z)`` HU volume.
        labels: optional ``(X, Y, Z)`` labels, resized with nearest neighbour.
        size: output size ``S``.
        hu_window: HU range mapped to [0, 1].

    Returns:
        images ``(Z, S, S)`` float32 in [0, 1] and labels ``(Z, S, S)`` uint8 (or ``None``).
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be (X, Y, Z), got shape {hu.shape}.")
    low, high = float(hu_window[0]), float(hu_window[1])
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)).permute(2, 0, 1)[:, None]
    volume = (volume.clamp(low, high) - low) / (high - low)
    images = F.interpolate(volume, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if labels is None:
        return images, None
    if labels.shape != hu.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image shape {hu.shape}.")
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)).permute(2, 0, 1)[:, None]
    lab = F.interpolate(lab, size=(size, size), mode="nearest")[:, 0].numpy().astype(np.uint8)
    return images, lab


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def reliable_slices(labels: np.ndarray, spacing: Sequence[float]) -> list[int]:
    """Slices on which a classical lung mask is trusted as a training label.

    A slice is kept when both lungs are present with at least :data:`MIN_LUNG_AREA_MM2` each, their area ratio is
    at most :data:`MAX_LUNG_AREA_RATIO`, and, in volumes of at least five slices, the lung mask agrees with both
    neighbouring slices (Dice >= :data:`MIN_NEIGHBOUR_DICE`) and the slice is not in the top or bottom
    :data:`APEX_BASE_FRACTION` of the lungs' axial extent.

    Args:
        labels: ``(X, Y, Z)`` labels, 1 right, 2 left.
        spacing: voxel size in mm.

    Returns:
        the kept slice indices.
    """
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    depth = labels.shape[2]
    areas = np.stack([(labels == v).sum(axis=(0, 1)) for v in (1, 2)]) * pixel_mm2  # (2, Z)
    lung_z = np.flatnonzero(areas.sum(axis=0) > 0)
    volume = depth >= 5 and lung_z.size > 0
    if volume:
        margin = int(np.ceil(APEX_BASE_FRACTION * (lung_z[-1] - lung_z[0] + 1)))
        z_low, z_high = lung_z[0] + margin, lung_z[-1] - margin
    keep = []
    for z in range(depth):
        right, left = areas[:, z]
        if min(right, left) < MIN_LUNG_AREA_MM2 or max(right, left) > MAX_LUNG_AREA_RATIO * min(right, left):
            continue
        if volume:
            if not z_low <= z <= z_high or z == 0 or z == depth - 1:
                continue
            lung = labels[:, :, z] > 0
            if min(_dice(lung, labels[:, :, n] > 0) for n in (z - 1, z + 1)) < MIN_NEIGHBOUR_DICE:
                continue
        keep.append(z)
    return keep


def phantom_volumes(num_cases: int, seed: int = 0, slice_step: int = 2) -> Iterator[LungSlices]:
    """Synthetic chest CTs with pathology; lung truth includes consolidation and effusion.

    Cases alternate between bacterial-like lobar consolidation (screening label 0), severe COVID-like disease
    (severity label 1, large ground-glass and consolidated burden) and COVID-like screening cases; half have a
    pleural effusion. In-plane size (128-288 voxels), slice count, field of view, slice thickness and noise vary.
    Every ``slice_step``-th slice is kept, plus all slices of a consolidated or effused region's extent.
    """
    rng = np.random.default_rng(seed)
    kinds = (("screening", 0), ("severity", 1), ("screening", 1))
    for case in range(num_cases):
        task, label = kinds[case % len(kinds)]
        size = int(rng.choice([128, 160, 192, 224, 256, 288]))
        depth = int(rng.integers(20, 44))
        burden = float(rng.uniform(0.15, 0.45)) if label == 0 or task == "severity" else None
        phantom = make_phantom(label, task, (size, size, depth), seed=int(rng.integers(1 << 30)),
                               effusion_probability=0.5, burden=burden)
        keep = sorted(set(range(int(rng.integers(slice_step)), depth, slice_step))
                      | set(np.flatnonzero(phantom.lesions.any(axis=(0, 1)))[::2].tolist()))
        yield LungSlices(f"phantom{case:03d}", "phantom", phantom.image.astype(np.float32), phantom.lungs, keep)


def real_volumes(root: str | os.PathLike | None = None) -> Iterator[LungSlices]:
    """The real training sources under the real data folder (missing sources are skipped)."""
    root = Path(root) if root is not None else real_data_dir()
    ts_image = root / "totalsegmentator" / "example_ct_sm.nii.gz"
    ts_seg = root / "totalsegmentator" / "example_seg.nii.gz"
    if ts_image.is_file() and ts_seg.is_file():
        hu = _load(ts_image)[0].numpy()
        seg = _load(ts_seg, check_hu=False)[0].numpy().round().astype(np.int32)
        labels = lobes_to_lungs(seg, TOTALSEG_RIGHT_LOBES, TOTALSEG_LEFT_LOBES)
        yield LungSlices("totalseg_example", "totalsegmentator", hu, labels, list(range(hu.shape[2])))
    crop, crop_lobes = root / "cip" / "crop_ct_2slices.nrrd", root / "cip" / "derived_crop_ct_2slices_lobes.nrrd"
    if crop.is_file() and crop_lobes.is_file():
        hu = _load(crop, require_volume=False)[0].numpy()
        lobes = _load(crop_lobes, check_hu=False, require_volume=False)[0].numpy().round().astype(np.int32)
        labels = lobes_to_lungs(lobes, CIP_RIGHT_LOBES, CIP_LEFT_LOBES)
        yield LungSlices("cip_crop", "cip_crop", hu, labels, list(range(hu.shape[2])))
    classical: list[tuple[str, Path]] = [("normal001", root / "covid_ct_md" / "normal001"),
                                         ("dcmqi", root / "dcmqi_ct3slice")]
    classical += [(f"sbu_{p.parent.parent.name}_{p.stem.replace('-', '_')}", p)
                  for p in sorted((root / "ny_sbu_slices").glob("*/axial/*.dcm"))]
    for name, path in classical:
        if not path.exists():
            continue
        image = _load(path, require_volume=False)
        hu, spacing = image[0].numpy(), image.meta["spacing"]
        labels = classical_lung_mask(hu, spacing, body_mask(hu, spacing))
        keep = reliable_slices(labels, spacing)
        if keep:
            yield LungSlices(name, "classical", hu, labels, keep)


def build_dataset(output_dir: str | os.PathLike, num_phantoms: int = 48, num_val_phantoms: int = 6,
                  real_root: str | os.PathLike | None = None, include_real: bool = True,
                  val_real: Sequence[str] = ("sbu_A098752", "sbu_A072894"), seed: int = 0,
                  phantom_slice_step: int = 2) -> dict[str, Any]:
    """Write the slices and ``datalist.json`` under ``output_dir``.

    Args:
        output_dir: destination folder (``images/``, ``labels/``, ``datalist.json``, ``summary.json``).
        num_phantoms: training phantom cases.
        num_val_phantoms: validation phantom cases (other seeds).
        real_root: the real data folder (default: :func:`chestct.paths.real_data_dir`).
        include_real: use the real sources.
        val_real: name prefixes of real volumes kept for validation instead of training.
        seed: seed of the phantom cohort.
        phantom_slice_step: keep every n-th phantom slice.

    Returns:
        the datalist (also written to ``output_dir/datalist.json``), with a ``summary`` of slices per source.
    """
    if num_phantoms < 0 or num_val_phantoms < 0:
        raise ValueError(f"phantom counts must be >= 0, got {num_phantoms}, {num_val_phantoms}.")
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    datalist: dict[str, Any] = {"training": [], "validation": []}
    summary: dict[str, dict[str, int]] = {}

    def write(volume: LungSlices, split: str) -> None:
        images, labels = prepare_slices(volume.hu[:, :, list(volume.keep)], volume.labels[:, :, list(volume.keep)])
        repeats = SOURCE_REPEATS[volume.source] if split == "training" else 1
        for z, image, label in zip(volume.keep, images, labels):
            stem = f"{volume.name}_z{z:03d}"
            np.save(out / "images" / f"{stem}.npy", image.astype(np.float16))
            np.save(out / "labels" / f"{stem}.npy", label)
            item = {"image": f"images/{stem}.npy", "label": f"labels/{stem}.npy", "source": volume.source,
                    "case": volume.name}
            datalist[split].extend([item] * repeats)
        counts = summary.setdefault(f"{split}/{volume.source}", {"volumes": 0, "slices": 0})
        counts["volumes"] += 1
        counts["slices"] += len(volume.keep)

    for volume in phantom_volumes(num_phantoms, seed=seed, slice_step=phantom_slice_step):
        write(volume, "training")
    for volume in phantom_volumes(num_val_phantoms, seed=seed + 1000, slice_step=4):
        volume.name = "val_" + volume.name
        write(volume, "validation")
    if include_real:
        for volume in real_volumes(real_root):
            write(volume, "validation" if volume.name.startswith(tuple(val_real)) else "training")
    datalist["summary"] = summary
    write_json(datalist, out / "datalist.json")
    return datalist


class RandLungFlipd(RandomizableTransform, MapTransform):
    """Mirror the patient left-right (first spatial axis, x) and swap the right (1) and left (2) lung labels.

    Args:
        keys: image and label keys (channel-first ``(C, X, Y)``).
        label_key: the key whose values 1 and 2 are swapped.
        prob: probability of the flip.
    """

    def __init__(self, keys: Sequence[str], label_key: str = "label", prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=(1,))
            if key == self.label_key:
                label = d[key]
                d[key] = torch.where(label == 1, 2, torch.where(label == 2, 1, label)).to(label.dtype)
        return d


class RandResolutiond(RandomizableTransform, MapTransform):
    """Simulate a coarse scan: downsample the image (bilinear) to a random size, then back to its own size.

    Thick, low-resolution inputs (for example a 64x64 grid) reach the model resized up to 256; this teaches it
    that look. Labels are left unchanged.

    Args:
        keys: image keys (channel-first ``(C, H, W)``).
        min_size: smallest intermediate size in pixels.
        max_size: largest intermediate size.
        prob: probability of applying it.
    """

    def __init__(self, keys: Sequence[str], min_size: int = 48, max_size: int = 160, prob: float = 0.3) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if not 4 <= min_size <= max_size:
            raise ValueError(f"need 4 <= min_size <= max_size, got {min_size}, {max_size}.")
        self.min_size, self.max_size = min_size, max_size
        self.size = min_size

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.size = int(self.R.randint(self.min_size, self.max_size + 1))

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            shape = image.shape[1:]
            small = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear",
                                  align_corners=False, antialias=True)
            d[key] = F.interpolate(small, size=shape, mode="bilinear", align_corners=False)[0].to(image.dtype)
        return d


class NetworkLungMask(ModelLungMask):
    """:class:`~chestct.lungseg_model.ModelLungMask` around an in-memory network (and optionally a checkpoint).

    The evaluation and inference configs use it so that a checkpoint can be measured before it is exported; the
    slice preprocessing, batching and post-processing are ModelLungMask's.

    Args:
        network: the segmenter, ``(B, 1, S, S) -> (B, 3, S, S)`` logits.
        ckpt_path: a checkpoint holding ``{"model": state_dict}`` or a bare state dict (``None``: use as is).
        device: where to run (default: the network's device).
        batch_size: slices per forward pass.
        postprocess: largest 3D component per lung and in-plane hole filling.

    Raises:
        ChestCTInputError: the checkpoint is missing.
    """

    def __init__(self, network: torch.nn.Module, ckpt_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, batch_size: int = 16, postprocess: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        if ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise ChestCTInputError(Path(ckpt_path), "no such checkpoint: train the bundle first")
            state = torch.load(str(ckpt_path), map_location=self.device, weights_only=True)
            network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self.model = network.to(self.device).eval()
        self.batch_size, self.image_size = batch_size, LUNGSEG_IMAGE_SIZE
        self.hu_window = (float(LUNGSEG_HU_WINDOW[0]), float(LUNGSEG_HU_WINDOW[1]))
        self.postprocess = postprocess


def lung_metrics(pred: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, Hausdorff 95 (mm, MONAI) and volume error (mL) per lung between two ``(X, Y, Z)`` label maps (1, 2)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: dict[str, float] = {}
    for value, name in ((1, "right"), (2, "left"), (None, "lungs")):
        p = pred > 0 if value is None else pred == value
        r = reference > 0 if value is None else reference == value
        out[f"dice_{name}"] = _dice(p, r)
        if p.any() and r.any():
            hd = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(r)[None, None],
                                            percentile=95, spacing=[float(s) for s in spacing])
            out[f"hd95_mm_{name}"] = float(hd.item())
        else:
            out[f"hd95_mm_{name}"] = float("nan")
        out[f"volume_ml_{name}"] = float(p.sum()) * voxel_ml
        out[f"volume_error_ml_{name}"] = (float(p.sum()) - float(r.sum())) * voxel_ml
    return out


def evaluate_volumes(cases: Sequence[dict[str, Any]], segmenter: Any, output_dir: str | os.PathLike,
                     use_body: bool = True) -> dict[str, float]:
    """Segment each case and compare with its reference lung labels; write ``metrics.json`` and ``per_case.csv``.

    Args:
        cases: items ``{"image": scan, "label": label map, "right": [codes], "left": [codes]}``; the codes of the
            right and left lung in the label map default to ``[1]`` and ``[2]`` (CIP maps: ``[2]`` and ``[3]``).
        segmenter: ``(hu, spacing, body) -> (X, Y, Z)`` labels, e.g. :class:`NetworkLungMask`.
        output_dir: where the reports go.
        use_body: restrict the prediction to the body mask.

    Returns:
        the metrics averaged over the cases (also in ``metrics.json``, with ``num_cases``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        image = load_ct(case["image"], require_volume=False)
        hu, spacing = image[0].numpy(), image.meta["spacing"]
        reference = load_ct(case["label"], check_hu=False, require_volume=False)[0].numpy().round().astype(np.int32)
        reference = lobes_to_lungs(reference, case.get("right", [1]), case.get("left", [2]))
        pred = segmenter(hu, spacing, body_mask(hu, spacing) if use_body else None)
        name = str(case.get("case_id", Path(case["image"]).name))
        rows.append({"case": name, **lung_metrics(pred, reference, spacing)})
    keys = [k for k in rows[0] if k != "case"] if rows else []
    metrics: dict[str, float] = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    metrics["num_cases"] = len(rows)
    write_json(metrics, out / "metrics.json")
    with open(out / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", *keys])
        writer.writeheader()
        writer.writerows(rows)
    return metrics


def segment_scans(scans: Sequence[dict[str, Any]], segmenter: Any, output_dir: str | os.PathLike,
                  use_body: bool = True) -> list[dict[str, Any]]:
    """Write each scan's lung labels as NIfTI on the input's voxel grid, and a ``lung_volumes.csv`` for all.

    Args:
        scans: items ``{"image": path, "case_id": name}`` (as :func:`chestct.bags.list_scans` gives).
        segmenter: ``(hu, spacing, body) -> (X, Y, Z)`` labels (post-processed), e.g. :class:`NetworkLungMask`.
        output_dir: receives ``<case_id>_lungs.nii.gz`` (0 background, 1 right lung, 2 left lung).
        use_body: restrict the prediction to the body mask.

    Returns:
        one row per scan: case_id, file, right/left volume in mL, or the error for a scan that failed.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for scan in scans:
        case_id = str(scan.get("case_id", Path(scan["image"]).name.split(".")[0]))
        try:
            image = load_ct(scan["image"])
            hu, spacing = image[0].numpy(), image.meta["spacing"]
            labels = segmenter(hu, spacing, body_mask(hu, spacing) if use_body else None)
            path = save_nifti_like_input(labels, image.meta["affine"].numpy(), image.meta["original_affine"].numpy(),
                                         out / f"{case_id}_lungs.nii.gz")
            voxel_ml = float(np.prod(spacing)) / 1000.0
            rows.append({"case_id": case_id, "file": str(path), "right_ml": float((labels == 1).sum()) * voxel_ml,
                         "left_ml": float((labels == 2).sum()) * voxel_ml, "error": ""})
        except (ChestCTInputError, OSError, RuntimeError, ValueError) as error:
            rows.append({"case_id": case_id, "file": "", "right_ml": float("nan"), "left_ml": float("nan"),
                         "error": str(error)})
    with open(out / "lung_volumes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "file", "right_ml", "left_ml", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


# The held-out checks of the issue (numbers reported in the bundle README).
CONSOLIDATION_PHANTOM: dict[str, Any] = {"label": 0, "task": "screening", "shape": (192, 192, 40), "seed": 11,
                                         "burden": 0.3}
LUNGMASK_SLICES_REFERENCE = 101_288


def held_out_report(segmenter: Any, real_root: str | os.PathLike | None = None,
                    figure_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The issue's three checks for a segmenter and for the classical mask, and optionally the comparison figure.

    Args:
        segmenter: ``(hu, spacing, body) -> labels`` (e.g. :class:`~chestct.lungseg_model.ModelLungMask`).
        real_root: the real data folder (default: :func:`chestct.paths.real_data_dir`).
        figure_path: PNG with classical and learned outlines on held-out real slices and the consolidation phantom.

    Returns:
        ``ct64`` (lung metrics vs the 10002K-derived mask), ``lungmask_slices`` (voxel counts vs 101,288) and
        ``consolidation`` (share of the consolidation missed by the classical mask that the model keeps).
    """
    root = Path(real_root) if real_root is not None else real_data_dir()
    report: dict[str, Any] = {}
    panels = []
    image = load_ct(root / "cip" / "ct-64.nrrd")
    hu, spacing = image[0].numpy(), image.meta["spacing"]
    body = body_mask(hu, spacing)
    reference = load_ct(root / "cip" / "derived_ct-64_lungmask_from_10002K.nrrd", check_hu=False)[0].numpy()
    reference = lobes_to_lungs(reference.round().astype(np.int32), (2,), (3,))
    model, classical = segmenter(hu, spacing, body), classical_lung_mask(hu, spacing, body)
    report["ct64"] = {"model": lung_metrics(model, reference, spacing),
                      "classical": lung_metrics(classical, reference, spacing)}
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    panels.append(("cip/ct-64 (held out)", hu[:, :, z], classical[:, :, z], model[:, :, z], reference[:, :, z]))
    image = load_ct(root / "lungmask_slices")
    hu, spacing = image[0].numpy(), image.meta["spacing"]
    body = body_mask(hu, spacing)
    model, classical = segmenter(hu, spacing, body), classical_lung_mask(hu, spacing, body)
    report["lungmask_slices"] = {
        "reference_r231": LUNGMASK_SLICES_REFERENCE,
        **{f"{name}_{part}": int(((labels > 0) if value is None else (labels == value)).sum())
           for name, labels in (("model", model), ("classical", classical))
           for part, value in (("lungs", None), ("right", 1), ("left", 2))},
    }
    for name in ("model", "classical"):
        report["lungmask_slices"][f"{name}_error_percent"] = 100.0 * (
            report["lungmask_slices"][f"{name}_lungs"] / LUNGMASK_SLICES_REFERENCE - 1.0)
    panels.append(("lungmask_slices/0 (held out)", hu[:, :, 0], classical[:, :, 0], model[:, :, 0], None))
    phantom = make_phantom(**CONSOLIDATION_PHANTOM)
    hu, spacing = phantom.image.astype(np.float32), phantom.spacing
    body = body_mask(hu, spacing)
    model, classical = segmenter(hu, spacing, body), classical_lung_mask(hu, spacing, body)
    missed = phantom.lesions.astype(bool) & (classical == 0)
    report["consolidation"] = {
        "phantom": {k: list(v) if isinstance(v, tuple) else v for k, v in CONSOLIDATION_PHANTOM.items()},
        "lesion_type": phantom.info["lesion_type"],
        "missed_by_classical_voxels": int(missed.sum()),
        "missed_share_of_lung": float(missed.sum() / max(1, (phantom.lungs > 0).sum())),
        "model_coverage_of_missed": float((model > 0)[missed].mean()) if missed.any() else float("nan"),
        "model_lung_dice": _dice(model > 0, phantom.lungs > 0),
        "classical_lung_dice": _dice(classical > 0, phantom.lungs > 0),
    }
    z = int(np.argmax(missed.sum(axis=(0, 1))))
    panels.append(("phantom, lobar consolidation", hu[:, :, z], classical[:, :, z], model[:, :, z],
                   phantom.lungs[:, :, z]))
    if figure_path is not None:
        save_mask_comparison(panels, figure_path)
    return report


def save_mask_comparison(panels: Sequence[tuple], path: str | os.PathLike) -> Path:
    """A PNG of axial slices with the classical (yellow, dashed) and learned (red) lung outlines.

    Args:
        panels: ``(title, hu (X, Y), classical (X, Y), model (X, Y), reference (X, Y) or None)``; a reference is
            drawn in green.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, hu, classical, model, reference) in zip(axes[0], panels):
        ax.imshow(hu.T, cmap="gray", vmin=-1200, vmax=300, interpolation="bilinear")
        for mask, colour, style in ((reference, "lime", "dotted"), (classical, "yellow", "dashed"),
                                    (model, "red", "solid")):
            if mask is not None and (mask > 0).any():
                ax.contour((mask > 0).T, levels=[0.5], colors=colour, linestyles=style, linewidths=1.2)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    figure.suptitle("lung outlines: classical threshold mask (yellow, dashed), learned ResNeSt segmenter (red), "
                    "reference (green, dotted)\npatient's right on the viewer's left", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the lung segmenter's 2D training set, or measure a model.")
    parser.add_argument("output_dir", help="dataset folder (or, with --measure, the folder for report.json)")
    parser.add_argument("--measure", default=None, metavar="MODEL_TS",
                        help="instead of building: the held-out checks of this TorchScript model, with a figure")
    parser.add_argument("--num-phantoms", type=int, default=48)
    parser.add_argument("--num-val-phantoms", type=int, default=6)
    parser.add_argument("--real-root", default=None)
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.measure:
        out = Path(args.output_dir)
        report = held_out_report(ModelLungMask(args.measure, device="cpu"), args.real_root,
                                 out / "lungseg_comparison.png")
        write_json(report, out / "report.json")
        print(json.dumps(report, indent=2))
        return
    datalist = build_dataset(args.output_dir, args.num_phantoms, args.num_val_phantoms, args.real_root,
                             not args.no_real, seed=args.seed)
    for key, value in datalist["summary"].items():
        print(f"{key:32s} {value['volumes']:4d} volumes {value['slices']:6d} slices")
    print(f"training items {len(datalist['training'])}, validation items {len(datalist['validation'])}")


if __name__ == "__main__":
    main()
