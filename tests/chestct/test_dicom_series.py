"""Tests of the DICOM series writer: headers, sorting by position, and voxel-exact read-back with pydicom and ITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from chestct.dicom_series import read_dicom_series_hu, write_dicom_series
from chestct.errors import ChestCTInputError

SPACING = (0.7, 0.9, 2.5)  # sx != sy so that a swapped PixelSpacing is caught
ORIGIN = (-12.5, -30.0, 40.0)


def _volume(seed: int, shape: tuple[int, int, int] = (20, 14, 6), padding: int | None = None) -> np.ndarray:
    """A random HU volume whose X and Y sizes differ, so that a transposed slice cannot pass."""
    img = np.random.default_rng(seed).integers(-1024, 1500, shape).astype(np.int16)
    if padding is not None:
        img[0, 0, :] = padding
    return img


def _read_pydicom(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    slices = [pydicom.dcmread(f) for f in folder.glob("*.dcm")]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices], axis=-1)
    return vol, slices


@pytest.mark.parametrize(
    "padding,intercept,pixel_representation", [(None, -1024, 0), (-3024, -1024, 1), (None, 0, 1), (-2048, -3072, 0)]
)
def test_round_trip_pydicom(tmp_path, padding, intercept, pixel_representation):
    img = _volume(0, padding=padding)
    out = write_dicom_series(img, SPACING, tmp_path / "s", origin=ORIGIN, rescale_intercept=intercept, uid_seed="t")
    vol, slices = _read_pydicom(out)
    np.testing.assert_array_equal(vol, img)
    first = slices[0]
    assert first.Rows == img.shape[1] and first.Columns == img.shape[0]
    assert [float(s) for s in first.PixelSpacing] == [SPACING[1], SPACING[0]]  # (row = y, column = x)
    assert [float(s) for s in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert first.PixelRepresentation == pixel_representation
    assert first.Modality == "CT" and first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.BitsAllocated == 16 and float(first.RescaleSlope) == 1.0
    zs = [float(s.ImagePositionPatient[2]) for s in slices]
    np.testing.assert_allclose(zs, ORIGIN[2] + SPACING[2] * np.arange(img.shape[2]))
    assert [s.InstanceNumber for s in slices] == list(range(1, img.shape[2] + 1))
    assert len({s.SOPInstanceUID for s in slices}) == img.shape[2]
    assert len({s.SeriesInstanceUID for s in slices}) == 1


def test_shuffled_file_names_and_itk(tmp_path):
    itk = pytest.importorskip("itk")
    img = _volume(1, padding=-3024)
    out = write_dicom_series(img, SPACING, tmp_path / "s", origin=ORIGIN, shuffle_filenames_seed=3)
    by_name = [pydicom.dcmread(f).InstanceNumber for f in sorted(out.glob("*.dcm"))]
    assert by_name != sorted(by_name)  # file name order differs from slice order
    # ITK sorts by position and applies the rescale; its array is [z, y, x].
    itk_image = itk.imread(str(out))
    np.testing.assert_array_equal(itk.array_view_from_image(itk_image).transpose(2, 1, 0), img)
    np.testing.assert_allclose(tuple(itk_image.GetSpacing()), SPACING, rtol=1e-6)
    np.testing.assert_allclose(tuple(itk_image.GetOrigin()), ORIGIN, rtol=1e-6)
    vol, spacing = read_dicom_series_hu(out)
    np.testing.assert_array_equal(vol, img)
    np.testing.assert_allclose(spacing, SPACING)


def test_deterministic_uids(tmp_path):
    img = _volume(2)
    a = write_dicom_series(img, SPACING, tmp_path / "a", uid_seed="case-1", shuffle_filenames_seed=1)
    b = write_dicom_series(img, SPACING, tmp_path / "b", uid_seed="case-1", shuffle_filenames_seed=1)
    c = write_dicom_series(img, SPACING, tmp_path / "c")
    for f in sorted(a.glob("*.dcm")):
        assert f.read_bytes() == (b / f.name).read_bytes()
    assert (
        pydicom.dcmread(next(a.glob("*.dcm"))).SeriesInstanceUID
        != pydicom.dcmread(next(c.glob("*.dcm"))).SeriesInstanceUID
    )


def test_explicit_uids(tmp_path):
    out = write_dicom_series(
        _volume(3), SPACING, tmp_path / "s", series_uid="1.2.3.4", study_uid="1.2.3.5", patient_id="P7"
    )
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert ds.SeriesInstanceUID == "1.2.3.4" and ds.StudyInstanceUID == "1.2.3.5" and ds.PatientID == "P7"


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"image": np.zeros((4, 4), np.int16)}, r"\(4, 4\)"),
        ({"spacing": (1.0, 0.0, 1.0)}, "0.0"),
        ({"spacing": (1.0, 1.0)}, r"\(1.0, 1.0\)"),
        ({"image": np.full((4, 4, 2), 70000, np.int32)}, "71024"),
        ({"image": np.full((4, 4, 2), 0.5)}, "fractional"),
        ({"rescale_intercept": -1024.5}, "-1024.5"),
    ],
)
def test_ill_arguments(tmp_path, kwargs, bad):
    args = {"image": np.zeros((4, 4, 2), np.int16), "spacing": (1.0, 1.0, 1.0), "out_dir": tmp_path / "s"} | kwargs
    with pytest.raises(ValueError, match=bad):
        write_dicom_series(**args)


def test_refuses_folder_with_dicom(tmp_path):
    write_dicom_series(np.zeros((4, 4, 2), np.int16), (1.0, 1.0, 1.0), tmp_path / "s")
    with pytest.raises(ValueError, match="already holds"):
        write_dicom_series(np.zeros((4, 4, 2), np.int16), (1.0, 1.0, 1.0), tmp_path / "s")


def test_read_empty_folder(tmp_path):
    with pytest.raises(ChestCTInputError, match="no .dcm"):
        read_dicom_series_hu(tmp_path)
