"""Write a CT volume as an axial DICOM series (one uncompressed file per slice).

The writer exists so that the synthetic cohort can exercise the DICOM loading path exactly like a scanner export:
one file per slice, positions in LPS millimetres, rescale slope and intercept, and optionally file names that do
not follow the slice order (loaders must sort by ``ImagePositionPatient``, never by file name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from chestct.errors import ChestCTInputError

__all__ = ["DEFAULT_RESCALE_INTERCEPT", "read_dicom_series_hu", "write_dicom_series"]

# Most scanners store CT numbers shifted by 1024 so that air (-1000 HU) becomes a small positive integer.
DEFAULT_RESCALE_INTERCEPT: float = -1024.0
# Lung window written into the headers so that viewers open the series in a useful display.
LUNG_WINDOW_CENTER: float = -600.0
LUNG_WINDOW_WIDTH: float = 1500.0

_UINT16_MAX = int(np.iinfo(np.uint16).max)
_INT16_MIN = int(np.iinfo(np.int16).min)
_INT16_MAX = int(np.iinfo(np.int16).max)


def _uid(uid_seed: str | None, *parts: str) -> str:
    """A DICOM UID: deterministic (hash of ``uid_seed`` and ``parts``) when a seed is given, random otherwise."""
    if uid_seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[str(uid_seed), *parts]))


def write_dicom_series(
    image: np.ndarray,
    spacing: Sequence[float],
    out_dir: str | Path,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_description: str = "synthetic chest CT phantom",
    modality: str = "CT",
    patient_id: str = "PHANTOM",
    series_uid: str | None = None,
    study_uid: str | None = None,
    shuffle_filenames_seed: int | None = None,
    rescale_intercept: float = DEFAULT_RESCALE_INTERCEPT,
    uid_seed: str | None = None,
) -> Path:
    """Write ``image`` as one CT DICOM file per axial slice.

    Args:
        image: (X, Y, Z) array of integer Hounsfield units in LPS voxel order (x toward the patient's left,
            y toward posterior, z toward superior), as produced by :func:`chestct.phantoms.make_phantom`.
        spacing: voxel size in mm, (sx, sy, sz).
        out_dir: folder to create; it must not already hold DICOM files (a mixed folder would be two series).
        origin: LPS position in mm of voxel (0, 0, 0), i.e. the ``ImagePositionPatient`` of the first slice.
        series_description: the ``SeriesDescription`` tag.
        modality: the ``Modality`` tag.
        patient_id: the ``PatientID`` (and ``PatientName``) tag.
        series_uid: ``SeriesInstanceUID``; generated when ``None``.
        study_uid: ``StudyInstanceUID``; generated when ``None``.
        shuffle_filenames_seed: when given, the files are numbered in a random (seeded) order so that the file
            name order differs from the slice order; when ``None``, ``slice_0000.dcm`` is the lowest slice.
        rescale_intercept: stored value = HU - intercept. Stored values are unsigned 16-bit when this makes all of
            them non-negative, signed 16-bit otherwise.
        uid_seed: when given, every generated UID is derived from it, so the series is byte-for-byte reproducible
            (no dates or times are written either).

    Returns:
        The series folder.

    Raises:
        ValueError: ``image`` is not 3D or not integer-valued, the spacing is not 3 positive numbers, or the values
            do not fit 16 bits after the intercept.
    """
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must be a 3D (X, Y, Z) array, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"image must hold integer HU values, got dtype {arr.dtype} with fractional values.")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or min(spacing_t) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (sx, sy, sz) in mm, got {spacing}.")
    origin_t = tuple(float(o) for o in origin)
    if len(origin_t) != 3:
        raise ValueError(f"origin must be 3 numbers (LPS mm), got {origin}.")
    if float(rescale_intercept) != int(rescale_intercept):
        raise ValueError(f"rescale_intercept must be a whole number, got {rescale_intercept}.")
    intercept = int(rescale_intercept)

    stored = arr.astype(np.int64) - intercept
    lo, hi = int(stored.min()), int(stored.max())
    if lo >= 0 and hi <= _UINT16_MAX:
        stored_dtype, pixel_representation = np.dtype("<u2"), 0
    elif lo >= _INT16_MIN and hi <= _INT16_MAX:
        stored_dtype, pixel_representation = np.dtype("<i2"), 1
    else:
        raise ValueError(
            f"image values minus rescale_intercept={intercept} span [{lo}, {hi}], which fits neither uint16 nor int16."
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.dcm")):
        raise ValueError(f"out_dir {out} already holds .dcm files; write each series into an empty folder.")

    nx, ny, nz = arr.shape
    study = study_uid or _uid(uid_seed, "study")
    series = series_uid or _uid(uid_seed, "series")
    frame_of_reference = _uid(uid_seed, "frame")
    if shuffle_filenames_seed is None:
        file_numbers = np.arange(nz)
    else:
        file_numbers = np.random.default_rng(shuffle_filenames_seed).permutation(nz)

    sx, sy, sz = spacing_t
    for k in range(nz):
        sop_uid = _uid(uid_seed, "sop", str(k)) if uid_seed is not None else _uid(None)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = modality
        ds.Manufacturer = "chestct phantom"
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"  # head first supine: the LPS axes below assume it
        ds.KVP = "120"
        # z increases with the slice index: slice k lies sz mm above slice k - 1.
        z_mm = origin_t[2] + k * sz
        ds.ImagePositionPatient = [f"{origin_t[0]:.6g}", f"{origin_t[1]:.6g}", f"{z_mm:.6g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z_mm:.6g}"
        ds.SliceThickness = f"{sz:.6g}"
        ds.SpacingBetweenSlices = f"{sz:.6g}"
        # PixelSpacing is (row spacing, column spacing): rows advance along y, columns along x.
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.Rows = ny
        ds.Columns = nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleIntercept = str(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = f"{LUNG_WINDOW_CENTER:g}"
        ds.WindowWidth = f"{LUNG_WINDOW_WIDTH:g}"
        # The pixel matrix is [row = y, column = x]; our array is [x, y], hence the transpose.
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype(stored_dtype).tobytes()
        ds.save_as(out / f"slice_{int(file_numbers[k]):04d}.dcm", enforce_file_format=True)
    return out


def read_dicom_series_hu(folder: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a series written by :func:`write_dicom_series` back into (X, Y, Z) HU, sorted by slice position.

    A small reference reader for tests and checks; the pipeline's loader lives in ``chestct.io``.

    Args:
        folder: the series folder.

    Returns:
        (X, Y, Z) int16 HU array and its spacing (sx, sy, sz) in mm.
    """
    files = sorted(Path(folder).glob("*.dcm"))
    if not files:
        raise ChestCTInputError(folder, "no .dcm files in this folder")
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack(
        [d.pixel_array.T.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices],
        axis=-1,
    )
    row_mm, col_mm = (float(s) for s in slices[0].PixelSpacing)
    sz = (
        float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
        if len(slices) > 1
        else float(slices[0].SliceThickness)
    )
    return np.round(vol).astype(np.int16), (col_mm, row_mm, sz)
