"""The shared preprocessing run on one scan (load, body crop, lung mask, window) and its quality-control report."""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor
from tqdm.auto import tqdm

from chestct.constants import BODY_CROP_MIN_SIZE, LUNG_LEFT, LUNG_RIGHT
from chestct.errors import ChestCTInputError
from chestct.io import load_ct
from chestct.lungmask import LungMaskMethod, get_lung_mask_method
from chestct.transforms import BodyCropd, HUWindowd, LungMaskd
from chestct.writers import save_nifti_like_input, save_qc_montage, uncrop, write_json

__all__ = ["PreprocessedScan", "peak_rss_mb", "preprocess_scan", "run_quality_control", "scan_name"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class PreprocessedScan:
    """One scan after the shared preprocessing.

    Attributes:
        image: HU-windowed volume in ``[0, 1]``, cropped to the body, ``(1, X', Y', Z)``.
        hu: the cropped volume in HU, same grid.
        body: body mask (uint8), same grid.
        lungs: lung labels (0, 1 right, 2 left), same grid.
        input_shape: ``(X, Y, Z)`` of the loaded (canonical) volume before cropping.
        input_affine: its voxel-to-RAS affine; ``original_affine`` is the input file's own.
        body_box: ``(start, end)`` of the crop in the loaded volume.
        timings_s: seconds per stage.
        warnings: warnings raised while loading (for example irregular slice spacing).
    """

    image: MetaTensor
    hu: MetaTensor
    body: MetaTensor
    lungs: MetaTensor
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    original_affine: np.ndarray
    body_box: tuple[list[int], list[int]]
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.hu.meta["spacing"])

    def lung_volume_ml(self) -> dict[str, float]:
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        lungs = np.asarray(self.lungs[0])
        return {
            "right": round(float((lungs == LUNG_RIGHT).sum()) * voxel_ml, 1),
            "left": round(float((lungs == LUNG_LEFT).sum()) * voxel_ml, 1),
        }


def preprocess_scan(
    path: str | os.PathLike,
    lung_method: str | LungMaskMethod = "classical",
    min_crop_size: int = BODY_CROP_MIN_SIZE,
    **load_kwargs: Any,
) -> PreprocessedScan:
    """Load a scan in HU, crop it to the body, mask the lungs and apply the lung window.

    Args:
        path: DICOM folder or file, NIfTI, NRRD or MHA.
        lung_method: lung mask method name or callable (see :class:`chestct.transforms.LungMaskd`).
        min_crop_size: minimum in-plane size of the body crop.
        load_kwargs: passed to :func:`chestct.io.load_ct`.

    Raises:
        ChestCTInputError: the scan cannot be used (see :func:`chestct.io.load_ct`), or no body or lungs are found.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hu = load_ct(path, **load_kwargs)
    timings["load"] = time.perf_counter() - start
    input_shape = tuple(int(s) for s in hu.shape[1:])
    input_affine = np.asarray(hu.affine, dtype=float)
    original_affine = np.asarray(hu.meta["original_affine"], dtype=float)

    tick = time.perf_counter()
    data = BodyCropd(keys="image", min_size=min_crop_size)({"image": hu})
    timings["body_crop"] = time.perf_counter() - tick

    tick = time.perf_counter()
    data = LungMaskd(keys="image", method=lung_method)(data)
    timings["lung_mask"] = time.perf_counter() - tick

    tick = time.perf_counter()
    windowed = HUWindowd(keys="image")({"image": data["image"]})["image"]
    timings["window"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    return PreprocessedScan(
        image=windowed,
        hu=data["image"],
        body=data["body"],
        lungs=data["lungs"],
        input_shape=input_shape,
        input_affine=input_affine,
        original_affine=original_affine,
        body_box=tuple(data["image"].meta["body_box"]),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=[str(w.message) for w in caught],
    )


def scan_name(path: str | os.PathLike) -> str:
    """A file-system friendly name for a scan: the file name without extension, or the folder name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _write_outputs(scan: PreprocessedScan, out_dir: Path) -> dict[str, str]:
    """NIfTI volumes on the input grid and a PNG montage; returns the written file names."""
    def full(volume: MetaTensor, fill: float = 0) -> np.ndarray:
        return uncrop(np.asarray(volume[0]), scan.body_box, scan.input_shape, fill=fill)

    files = {
        "preprocessed": save_nifti_like_input(full(scan.image), scan.input_affine, scan.original_affine,
                                              out_dir / "preprocessed.nii.gz", dtype=np.float32),
        "body": save_nifti_like_input(full(scan.body), scan.input_affine, scan.original_affine,
                                      out_dir / "body.nii.gz"),
        "lungs": save_nifti_like_input(full(scan.lungs), scan.input_affine, scan.original_affine,
                                       out_dir / "lungs.nii.gz"),
    }
    files["montage"] = save_qc_montage(
        full(scan.hu, fill=-1024), full(scan.lungs), out_dir / "montage.png", body_box=scan.body_box,
        title=out_dir.name,
    )
    return {key: path.name for key, path in files.items()}


def run_quality_control(
    scans: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    lung_method: str | LungMaskMethod = "classical",
    progress: bool = True,
    lung_method_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Preprocess each scan and write ``out_dir/<scan>/`` (NIfTI, montage, ``summary.json``).

    A scan that fails is reported (``status: "failed"`` and the reason) and the others go on.

    Raises:
        ChestCTInputError: the lung mask method cannot be set up (for example a missing model file).

    Returns:
        one summary per scan, in input order; also written as ``out_dir/summary.json``.
    """
    out_dir = Path(out_dir)
    scans = list(scans)
    lung_method = get_lung_mask_method(lung_method, **dict(lung_method_options or {}))  # load a model once
    summaries = []
    for path in tqdm(scans, desc="preprocess", unit="scan", disable=not progress):
        name = scan_name(path)
        try:
            scan = preprocess_scan(path, lung_method=lung_method)
            tick = time.perf_counter()
            files = _write_outputs(scan, out_dir / name)
            timings = dict(scan.timings_s, write=round(time.perf_counter() - tick, 3))
            summary = {
                "scan": str(path),
                "status": "ok",
                "shape": list(scan.input_shape),
                "cropped_shape": list(scan.hu.shape[1:]),
                "spacing_mm": [round(s, 4) for s in scan.spacing],
                "body_box": scan.body_box,
                "lung_volume_ml": scan.lung_volume_ml(),
                "timings_s": timings,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "warnings": scan.warnings,
                "files": files,
            }
            write_json(summary, out_dir / name / "summary.json")
        except ChestCTInputError as error:
            summary = {"scan": str(path), "status": "failed", "reason": error.reason}
        summaries.append(summary)
    write_json({"scans": summaries}, out_dir / "summary.json")
    return summaries
