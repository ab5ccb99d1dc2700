"""Loading chest CT in Hounsfield units from a DICOM series, a DICOM file, NIfTI, NRRD, MHA or any ITK-readable file.

Every loader returns a MONAI ``MetaTensor`` of shape ``(1, X, Y, Z)`` (float32, HU) in one canonical voxel order,
LPS: x runs toward the patient's left, y toward posterior, z toward superior. That is the order in which a DICOM
axial series is stored, so the common case needs no copy, and every downstream transform can rely on "axis 2 is
axial" and "low x is the patient's right". The affine in ``meta["affine"]`` maps voxels to RAS millimetres (MONAI's
convention); ``meta["original_affine"]`` is the file's own voxel grid, so outputs can be written back in the input
geometry (see :func:`reorient_to_original`).

Anything that cannot be used raises :class:`~chestct.errors.ChestCTInputError` naming the path and the reason.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from chestct.constants import HU_BODY_THRESHOLD
from chestct.errors import ChestCTInputError

__all__ = [
    "CANONICAL_AXCODES",
    "IrregularSpacingWarning",
    "list_dicom_series",
    "load_ct",
    "reorient_to_original",
]

CANONICAL_AXCODES = ("L", "P", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".img", ".hdr", ".vtk", ".tif", ".tiff")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# A field of view always holds air (outside the body or in the lungs); a volume without any value this low is not HU.
_AIR_EVIDENCE_HU = HU_BODY_THRESHOLD
# Compressed series decode in worker processes above this many slices (JPEG decoding holds the GIL).
_PARALLEL_DECODE_MIN_FILES = 48


class IrregularSpacingWarning(UserWarning):
    """A DICOM series whose slices are not evenly spaced (missing slices, or a mixed reconstruction)."""


@dataclass(frozen=True)
class _SliceHeader:
    path: str
    series_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    modality: str | None
    description: str
    rows: int
    columns: int
    frames: int


def load_ct(
    path: str | os.PathLike,
    series_uid: str | None = None,
    require_volume: bool = True,
    check_hu: bool = True,
    on_irregular_spacing: str = "warn",
    spacing_tolerance: float = 0.1,
    num_workers: int | None = None,
) -> MetaTensor:
    """Load one CT scan in HU as a ``(1, X, Y, Z)`` MetaTensor in LPS voxel order.

    Args:
        path: a DICOM series folder, a single DICOM file, or a NIfTI / NRRD / MHA / other ITK-readable volume.
        series_uid: which series to read when a folder holds several (the error lists them when this is unset).
        require_volume: raise when the input is a single 2D image; set ``False`` to load one slice as ``Z = 1``.
        check_hu: raise when the values cannot be Hounsfield units (an MR image, a normalised or 8-bit volume).
        on_irregular_spacing: what to do when DICOM slices are unevenly spaced or some are missing: ``"warn"``
            (stack them, warn with :class:`IrregularSpacingWarning`, and report in ``meta["slice_spacing_report"]``)
            or ``"error"``.
        spacing_tolerance: allowed relative deviation of a slice gap from the median gap.
        num_workers: processes used to decode compressed DICOM pixel data (default: up to 2, for long series).

    Returns:
        HU values, float32, shape ``(1, X, Y, Z)``, with ``affine`` (RAS), ``original_affine``, ``spacing``,
        ``filename_or_obj`` and the DICOM identifiers in ``meta``.

    Raises:
        ChestCTInputError: the path does not exist, is empty, holds several series, is not CT, is corrupt,
            is a single 2D image where a volume is required, or has unevenly spaced slices with ``"error"``.
    """
    if on_irregular_spacing not in ("warn", "error"):
        raise ValueError(f"on_irregular_spacing must be 'warn' or 'error', got {on_irregular_spacing!r}.")
    path = Path(path)
    if not path.exists():
        raise ChestCTInputError(path, "no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        array, affine, meta = _read_dicom_folder(path, series_uid, on_irregular_spacing, spacing_tolerance, num_workers)
    elif name.endswith(NIFTI_SUFFIXES):
        array, affine, meta = _read_nifti(path)
    elif name.endswith(ITK_SUFFIXES):
        array, affine, meta = _read_itk(path)
    elif _is_dicom_file(path):
        array, affine, meta = _read_dicom_files(path, [_read_header(path)], on_irregular_spacing, spacing_tolerance, 1)
    else:
        array, affine, meta = _read_itk(path)
    if array.ndim != 3:
        raise ChestCTInputError(path, f"expected a 3D volume, got an array of shape {tuple(array.shape)}")
    if require_volume and min(array.shape) < 2:
        raise ChestCTInputError(
            path, f"a single 2D image (shape {tuple(array.shape)}) where a volume is required; "
            "give the whole series folder, or load with require_volume=False"
        )
    if check_hu:
        _check_hounsfield(path, array, meta.get("modality"))
    array, canonical_affine = _to_canonical(array, affine)
    meta.update(
        {
            "affine": torch.as_tensor(canonical_affine, dtype=torch.float64),
            "original_affine": torch.as_tensor(affine, dtype=torch.float64),
            "spatial_shape": np.asarray(array.shape),
            "spacing": tuple(float(s) for s in np.linalg.norm(canonical_affine[:3, :3], axis=0)),
            "filename_or_obj": str(path),
            "space": "RAS",
            "original_channel_dim": "no_channel",
        }
    )
    # One C-contiguous (X, Y, Z) copy: scipy's labelling runs several times faster on it than on strided views.
    array = np.ascontiguousarray(array, dtype=np.float32)
    return MetaTensor(torch.from_numpy(array)[None], meta=meta)


def reorient_to_original(array: np.ndarray, affine: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Flip and transpose a canonical ``(X, Y, Z)`` array back to the voxel order of ``original_affine``.

    Args:
        array: spatial array ``(X, Y, Z)`` in the voxel order described by ``affine``.
        affine: its 4x4 voxel-to-RAS affine.
        original_affine: the 4x4 affine of the input file's voxel grid.

    Returns:
        the array in the input's voxel order; together with ``original_affine`` it is the input geometry.
    """
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.io_orientation(original_affine)
    )
    return nib.orientations.apply_orientation(array, transform)


def list_dicom_series(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Describe the DICOM series in a folder (uid, modality, description, number of files), largest first."""
    headers, _ = _scan_folder(Path(folder))
    return _describe_series(headers)


# -- DICOM -----------------------------------------------------------------------------------------------------


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    with open(path, "rb") as stream:
        stream.seek(128)
        return stream.read(4) == b"DICM"


def _read_header(path: Path) -> _SliceHeader:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        raise ChestCTInputError(path, f"not a readable DICOM file ({error})") from error
    except Exception as error:  # truncated or corrupt headers surface as many different exceptions
        raise ChestCTInputError(path, f"corrupt DICOM file ({type(error).__name__}: {error})") from error
    if "Rows" not in ds or "Columns" not in ds:
        raise ChestCTInputError(path, "a DICOM file without an image (no Rows/Columns): not a CT slice")
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    return _SliceHeader(
        path=str(path),
        series_uid=str(ds.get("SeriesInstanceUID", "unknown")),
        position=None if position is None else tuple(float(v) for v in position),
        orientation=None if orientation is None else tuple(float(v) for v in orientation),
        modality=None if ds.get("Modality") is None else str(ds.Modality),
        description=str(ds.get("SeriesDescription", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _scan_folder(folder: Path) -> tuple[list[_SliceHeader], list[str]]:
    """Read the headers of every DICOM file directly in ``folder``; return them and the names of other files."""
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ChestCTInputError(folder, "the folder is empty: expected a DICOM series")
    headers, others = [], []
    for file in files:
        try:
            headers.append(_read_header(file))
        except ChestCTInputError as error:
            if isinstance(error.__cause__, InvalidDicomError) and not _is_dicom_file(file):
                others.append(file.name)  # a licence or readme beside the series
            else:
                raise
    if not headers:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ChestCTInputError(folder, f"no DICOM files in the folder (found: {shown})")
    return headers, others


def _describe_series(headers: Sequence[_SliceHeader]) -> list[dict[str, Any]]:
    groups: dict[str, list[_SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].append(header)
    series = [
        {"series_uid": uid, "modality": group[0].modality, "description": group[0].description, "files": len(group)}
        for uid, group in groups.items()
    ]
    return sorted(series, key=lambda s: -s["files"])


def _read_dicom_folder(
    folder: Path, series_uid: str | None, on_irregular: str, tolerance: float, num_workers: int | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    headers, _ = _scan_folder(folder)
    series = _describe_series(headers)
    if series_uid is None and len(series) > 1:
        listing = "; ".join(
            f"{s['series_uid']} ({s['modality']}, '{s['description']}', {s['files']} files)" for s in series
        )
        raise ChestCTInputError(folder, f"the folder holds {len(series)} series, pass series_uid= one of: {listing}")
    uid = series_uid if series_uid is not None else series[0]["series_uid"]
    chosen = [h for h in headers if h.series_uid == uid]
    if not chosen:
        known = ", ".join(s["series_uid"] for s in series)
        raise ChestCTInputError(folder, f"no series with uid {uid!r} in the folder (found: {known})")
    return _read_dicom_files(folder, chosen, on_irregular, tolerance, num_workers)


def _read_dicom_files(
    source: Path, headers: list[_SliceHeader], on_irregular: str, tolerance: float, num_workers: int | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    first = headers[0]
    if first.modality is not None and first.modality.upper() != "CT":
        raise ChestCTInputError(source, f"modality is {first.modality}, not CT: this pipeline reads chest CT only")
    if any(h.frames > 1 for h in headers):
        raise ChestCTInputError(source, "multi-frame (enhanced) DICOM is not supported; export as one file per slice")
    if {(h.rows, h.columns) for h in headers} != {(first.rows, first.columns)}:
        raise ChestCTInputError(source, "slices of different sizes in one series")
    if len(headers) > 1 and any(h.position is None or h.orientation is None for h in headers):
        raise ChestCTInputError(source, "slices without ImagePositionPatient/ImageOrientationPatient cannot be ordered")
    orientation = np.asarray(first.orientation if first.orientation is not None else (1, 0, 0, 0, 1, 0), float)
    if any(h.orientation is not None and not np.allclose(h.orientation, orientation, atol=1e-3) for h in headers):
        raise ChestCTInputError(source, "slices with different orientations in one series")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([h.position if h.position is not None else (0.0, 0.0, 0.0) for h in headers], float)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    headers = [headers[i] for i in order]
    positions, distances = positions[order], distances[order]
    report = _spacing_report(distances, tolerance)
    if report["duplicates"]:
        raise ChestCTInputError(source, f"{report['duplicates']} slices share a position: two series mixed, or a copy")
    if report["irregular"]:
        message = (
            f"unevenly spaced slices: gaps from {report['min_gap_mm']:.3g} to {report['max_gap_mm']:.3g} mm around a "
            f"median of {report['median_gap_mm']:.3g} mm, about {report['missing_slices']} slice(s) missing"
        )
        if on_irregular == "error":
            raise ChestCTInputError(source, message)
        warnings.warn(f"{source}: {message}; the slices are stacked as they are", IrregularSpacingWarning, stacklevel=3)

    # Each slice is written straight into the (x, y, z) volume as it arrives from the decoding processes:
    # half the cost of stacking (z, y, x) and transposing afterwards.
    array = np.empty((first.columns, first.rows, len(headers)), dtype=np.float32)
    for index, (pixels, slope, intercept) in enumerate(_decode_all([h.path for h in headers], num_workers, source)):
        array[:, :, index] = pixels.T * np.float32(slope) + np.float32(intercept)

    ds = _dataset(headers[0].path)
    row_spacing, col_spacing = (float(v) for v in ds.get("PixelSpacing", (1.0, 1.0)))
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal * _thickness(ds)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # x index runs along a row, i.e. across columns
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    meta = {
        "modality": headers[0].modality,
        "series_uid": headers[0].series_uid,
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_description": headers[0].description,
        "manufacturer": str(ds.get("Manufacturer", "")),
        "num_files": len(headers),
        "slice_spacing_report": report,
    }
    return array, LPS_TO_RAS @ lps, meta


def _spacing_report(distances: np.ndarray, tolerance: float) -> dict[str, Any]:
    gaps = np.diff(distances)
    if gaps.size == 0:
        return {"irregular": False, "duplicates": 0, "missing_slices": 0}
    duplicates = int(np.sum(gaps < 1e-3))
    median = float(np.median(gaps))
    irregular = bool(median > 0 and np.any(np.abs(gaps - median) > tolerance * median))
    missing = int(np.sum(np.maximum(np.round(gaps / median) - 1, 0))) if median > 0 else 0
    return {
        "irregular": irregular,
        "duplicates": duplicates,
        "missing_slices": missing,
        "median_gap_mm": median,
        "min_gap_mm": float(gaps.min()),
        "max_gap_mm": float(gaps.max()),
    }


def _dataset(path: str):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _thickness(ds) -> float:
    return float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)


def _decode(path: str) -> tuple[np.ndarray, float, float]:
    """Stored pixel values of one slice ``(rows, columns)`` with its rescale slope and intercept."""
    import pydicom

    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    # Integers travel back from the decoding processes at half the size of float32.
    return ds.pixel_array, slope, intercept


def _decode_safely(path: str) -> tuple[np.ndarray, float, float] | str:
    try:
        return _decode(path)
    except Exception as error:  # reported with the file's name by the caller
        return f"{type(error).__name__}: {error}"


def _decode_all(
    paths: list[str], num_workers: int | None, source: Path
) -> Iterator[tuple[np.ndarray, float, float]]:
    """Decoded slices in the order of ``paths``, yielded as they are ready."""
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    if workers > 1 and len(paths) >= _PARALLEL_DECODE_MIN_FILES and _is_compressed(paths[0]):
        # Fork keeps start-up cheap; the workers only run pydicom and the JPEG codecs.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            chunk = max(1, len(paths) // (8 * workers))
            yield from _checked(paths, pool.map(_decode_safely, paths, chunksize=chunk), source)
    else:
        yield from _checked(paths, map(_decode_safely, paths), source)


def _checked(paths: list[str], results: Iterable, source: Path) -> Iterator[tuple[np.ndarray, float, float]]:
    for path, result in zip(paths, results):
        if isinstance(result, str):
            raise ChestCTInputError(path, f"corrupt or truncated pixel data ({result}) in the series {source}")
        yield result


def _is_compressed(path: str) -> bool:
    return bool(_dataset(path).file_meta.TransferSyntaxUID.is_compressed)


# -- NIfTI and ITK ---------------------------------------------------------------------------------------------


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    except Exception as error:
        raise ChestCTInputError(path, f"corrupt or truncated NIfTI file ({type(error).__name__}: {error})") from error
    array = _squeeze_to_3d(path, array)
    return array, np.asarray(image.affine, float), {"modality": None}


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import itk

    try:
        image = itk.imread(str(path), itk.F)
    except Exception as error:
        raise ChestCTInputError(path, f"not a readable image volume ({type(error).__name__}: {error})") from error
    array = np.asarray(itk.array_view_from_image(image)).T.copy()  # ITK gives (z, y, x)
    dims = array.ndim
    if dims == 2:
        array = array[..., None]
    spacing = np.ones(3)
    spacing[:dims] = np.asarray(itk.spacing(image), float)
    origin = np.zeros(3)
    origin[:dims] = np.asarray(itk.origin(image), float)
    direction = np.eye(3)
    direction[:dims, :dims] = np.asarray(image.GetDirection(), float)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    return _squeeze_to_3d(path, array), LPS_TO_RAS @ lps, {"modality": None}


def _squeeze_to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ChestCTInputError(path, f"expected one 3D volume, got an array of shape {array.shape}")
    return array


# -- checks and orientation --------------------------------------------------------------------------------------


def _check_hounsfield(path: Path, array: np.ndarray, modality: str | None) -> None:
    low, high = float(array.min()), float(array.max())
    if low > _AIR_EVIDENCE_HU or high - low < 200:
        hint = "an MR image" if modality is None else f"a {modality} image"
        raise ChestCTInputError(
            path,
            f"values range from {low:.4g} to {high:.4g}, which are not Hounsfield units (a CT shows air near -1000 "
            f"HU outside the body and in the lungs); is this {hint}, or a volume already normalised?",
        )


def _to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose ``array`` to LPS voxel order (no resampling) and return it with its new RAS affine."""
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    transform = nib.orientations.ornt_transform(current, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    new_array = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return new_array, new_affine
