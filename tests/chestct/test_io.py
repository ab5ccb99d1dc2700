"""Loading CT in HU: every real sample, slice order, geometry, and a clear error for each bad input."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from chestct.dicom_series import write_dicom_series
from chestct.errors import ChestCTInputError
from chestct.io import IrregularSpacingWarning, list_dicom_series, load_ct, reorient_to_original

SPACING = (1.5, 1.5, 3.0)


def _synthetic_hu(shape: tuple[int, int, int] = (32, 28, 6), seed: int = 0) -> np.ndarray:
    """A small CT-like volume in HU: air around a soft-tissue block with a dark 'lung', plus noise."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[4:-4, 4:-4] = 40
    hu[8:14, 8:-8] = -850
    return (hu + rng.integers(-20, 20, size=shape)).astype(np.int16)


@pytest.fixture()
def series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A synthetic CT series whose file names are not in slice order."""
    hu = _synthetic_hu()
    folder = write_dicom_series(hu, SPACING, tmp_path / "series", origin=(-20.0, -30.0, 100.0),
                                shuffle_filenames_seed=3, uid_seed="io-test")
    return folder, hu


# -- real data -------------------------------------------------------------------------------------------------

REAL_VOLUMES = [
    # relative path, canonical shape (X, Y, Z), load arguments
    ("covid_ct_md/normal001", (512, 512, 154), {}),  # JPEG Lossless series
    ("cip/ct-64Dicom", (64, 64, 79), {}),  # uncompressed series
    ("cip/ct-64.nrrd", (64, 64, 79), {}),
    ("cip/crop_ct_2slices.nrrd", (443, 349, 2), {}),
    ("lungmask_slices", (512, 512, 2), {}),  # no Modality tag: accepted because the values are HU
    ("dcmqi_ct3slice", (512, 512, 3), {}),  # -3024 padding
    ("totalsegmentator/example_ct.nii.gz", (122, 101, 112), {}),
    ("totalsegmentator/example_ct_sm.nii.gz", (122, 101, 30), {}),
    ("totalsegmentator/example_ct_dicom", (512, 512, 20), {}),  # JPEG 2000 series
    ("ny_sbu_slices/A002304/axial/19001231-076.dcm", (512, 512, 1), {"require_volume": False}),
    ("ny_sbu_slices/A002304/coronal/19001231-076.dcm", (512, 1, 512), {"require_volume": False}),
    ("ny_sbu_slices/A002304/sagittal/19001231-080.dcm", (1, 512, 512), {"require_volume": False}),
]


@pytest.mark.real_data
@pytest.mark.parametrize("relative, shape, kwargs", REAL_VOLUMES)
def test_real_volume_loads_in_hu(real_data: Path, relative: str, shape: tuple[int, ...], kwargs: dict) -> None:
    image = load_ct(real_data / relative, **kwargs)
    assert tuple(image.shape) == (1, *shape)
    assert image.dtype.is_floating_point
    assert float(image.min()) <= -900, "a CT field of view holds air near -1000 HU"
    assert 100 <= float(image.max()) <= 4000
    assert nib.aff2axcodes(image.affine.numpy()) == ("L", "P", "S")
    assert np.allclose(image.meta["spacing"], np.linalg.norm(image.affine.numpy()[:3, :3], axis=0))


@pytest.mark.real_data
def test_real_dicom_equals_nrrd_voxel_for_voxel(real_data: Path) -> None:
    from_dicom = load_ct(real_data / "cip/ct-64Dicom")
    from_nrrd = load_ct(real_data / "cip/ct-64.nrrd")
    np.testing.assert_array_equal(from_dicom.numpy(), from_nrrd.numpy())
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nrrd.affine.numpy(), atol=1e-3)


@pytest.mark.real_data
def test_real_series_ordered_by_position_not_name(real_data: Path, tmp_path: Path) -> None:
    source = sorted((real_data / "cip/ct-64Dicom").iterdir())
    for index, file in enumerate(reversed(source)):  # names now run against the slice order
        shutil.copy(file, tmp_path / f"{index:03d}.dcm")
    np.testing.assert_array_equal(load_ct(tmp_path).numpy(), load_ct(real_data / "cip/ct-64Dicom").numpy())


@pytest.mark.real_data
def test_real_padding_values_kept(real_data: Path) -> None:
    image = load_ct(real_data / "dcmqi_ct3slice")
    assert float(image.min()) == -3024.0


# -- synthetic series ------------------------------------------------------------------------------------------


def test_series_roundtrip_values_order_and_geometry(series: tuple[Path, np.ndarray]) -> None:
    folder, hu = series
    image = load_ct(folder)
    np.testing.assert_array_equal(image[0].numpy(), hu.astype(np.float32))
    assert image.meta["spacing"] == pytest.approx(SPACING)
    # voxel (0, 0, 0) sits at the series origin, LPS (-20, -30, 100) = RAS (20, 30, 100)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], [20.0, 30.0, 100.0])
    assert image.meta["modality"] == "CT"
    assert image.meta["slice_spacing_report"]["irregular"] is False


def test_nifti_in_another_orientation_is_canonicalised_and_written_back(tmp_path: Path) -> None:
    hu = _synthetic_hu().astype(np.float32)
    ras_affine = np.diag([1.5, 1.5, 3.0, 1.0])  # voxel order RAS: x toward the patient's right
    nib.save(nib.Nifti1Image(hu, ras_affine), tmp_path / "ras.nii.gz")
    image = load_ct(tmp_path / "ras.nii.gz")
    assert nib.aff2axcodes(image.affine.numpy()) == ("L", "P", "S")
    np.testing.assert_array_equal(image[0].numpy(), hu[::-1, ::-1])
    back = reorient_to_original(image[0].numpy(), image.affine.numpy(), image.meta["original_affine"].numpy())
    np.testing.assert_array_equal(back, hu)


# -- bad input: one error type, naming the path and the reason -----------------------------------------------


def _rewrite(folder: Path, **tags: object) -> None:
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        for name, value in tags.items():
            setattr(ds, name, value)
        ds.save_as(file)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ChestCTInputError, match="no such file"):
        load_ct(tmp_path / "absent")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ChestCTInputError, match="empty") as info:
        load_ct(tmp_path)
    assert info.value.path == str(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ChestCTInputError, match="no DICOM files"):
        load_ct(tmp_path)


def test_mr_series_is_refused(series: tuple[Path, np.ndarray]) -> None:
    folder, _ = series
    _rewrite(folder, Modality="MR")
    with pytest.raises(ChestCTInputError, match="modality is MR"):
        load_ct(folder)


def test_nifti_not_in_hu_is_refused(tmp_path: Path) -> None:
    normalised = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)  # values in [0, 1]
    nib.save(nib.Nifti1Image(normalised, np.eye(4)), tmp_path / "mr.nii.gz")
    with pytest.raises(ChestCTInputError, match="not Hounsfield units") as info:
        load_ct(tmp_path / "mr.nii.gz")
    assert "mr.nii.gz" in str(info.value)


def test_two_series_in_one_folder(series: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    folder, hu = series
    other = write_dicom_series(hu[:, :, :4], SPACING, tmp_path / "other", series_description="second",
                               uid_seed="other-series")
    for file in other.iterdir():
        shutil.move(str(file), folder / f"other_{file.name}")
    found = list_dicom_series(folder)
    assert [s["files"] for s in found] == [6, 4]
    with pytest.raises(ChestCTInputError, match="holds 2 series") as info:
        load_ct(folder)
    for entry in found:
        assert entry["series_uid"] in str(info.value)
    chosen = load_ct(folder, series_uid=found[1]["series_uid"])
    assert tuple(chosen.shape) == (1, 32, 28, 4)


def test_unknown_series_uid(series: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(ChestCTInputError, match="no series with uid"):
        load_ct(series[0], series_uid="1.2.3")


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(ChestCTInputError, match="scan.dcm"):
        load_ct(bad)


def test_truncated_slice_in_series(series: tuple[Path, np.ndarray]) -> None:
    folder, _ = series
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-700])  # pixel data cut short
    with pytest.raises(ChestCTInputError, match="corrupt or truncated") as info:
        load_ct(folder)
    assert victim.name in str(info.value)


def test_single_2d_image_where_volume_required(series: tuple[Path, np.ndarray]) -> None:
    one = sorted(series[0].iterdir())[0]
    with pytest.raises(ChestCTInputError, match="single 2D image"):
        load_ct(one)
    assert tuple(load_ct(one, require_volume=False).shape) == (1, 32, 28, 1)


def test_missing_slice_warns_and_reports(series: tuple[Path, np.ndarray]) -> None:
    folder, _ = series
    middle = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[3]
    middle.unlink()
    with pytest.warns(IrregularSpacingWarning, match="1 slice"):
        image = load_ct(folder)
    report = image.meta["slice_spacing_report"]
    assert report["irregular"] and report["missing_slices"] == 1
    with pytest.raises(ChestCTInputError, match="unevenly spaced"):
        load_ct(folder, on_irregular_spacing="error")


def test_duplicate_positions(series: tuple[Path, np.ndarray]) -> None:
    folder, _ = series
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "copy.dcm")
    with pytest.raises(ChestCTInputError, match="share a position"):
        load_ct(folder)


def test_bad_argument() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        load_ct(".", on_irregular_spacing="sometimes")


def test_regular_series_has_no_warning(series: tuple[Path, np.ndarray]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ct(series[0])


@pytest.mark.real_data
def test_every_real_single_slice_loads(real_data: Path) -> None:
    files = sorted((real_data / "ny_sbu_slices").rglob("*.dcm"))
    assert len(files) == 62
    for file in files:
        image = load_ct(file, require_volume=False)
        assert sorted(image.shape[1:])[0] == 1, file
        assert float(image.min()) <= -1000 and float(image.max()) >= 100, file


@pytest.mark.real_data
@pytest.mark.parametrize("relative", ["cip/lm-64.nrrd", "cip/derived_ct-64_lungmask_from_10002K.nrrd",
                                      "cip/derived_crop_ct_2slices_lobes.nrrd", "totalsegmentator/example_seg.nii.gz"])
def test_real_label_maps_are_not_ct(real_data: Path, relative: str) -> None:
    with pytest.raises(ChestCTInputError, match="not Hounsfield units"):
        load_ct(real_data / relative)
    labels = load_ct(real_data / relative, check_hu=False)
    assert float(labels.min()) >= 0
