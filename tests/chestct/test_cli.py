"""The ``chestct`` command: phantoms and preprocessing QC, outputs on the input grid, failures reported."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from chestct.cli import main
from chestct.phantoms import make_phantom, phantom_affine


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    assert main(["phantoms", "--out", str(out), "--num-cases", "4", "--shape", "64x64x16", "--quiet"]) == 0
    return out


def test_phantoms_command_writes_datalist(cohort: Path) -> None:
    datalist = json.loads((cohort / "datalist.json").read_text())
    assert len(datalist["training"]) == 4
    assert sorted(case["label"] for case in datalist["training"]) == [0, 0, 1, 1]
    for case in datalist["training"]:
        assert (cohort / case["image"]).is_file()


def test_phantoms_command_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["phantoms", "--out", str(tmp_path), "--num-cases", "0", "--quiet"]) == 2
    assert "0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["phantoms", "--out", str(tmp_path), "--shape", "64x64"])


def test_preprocess_command_reports_failures_and_goes_on(cohort: Path, tmp_path: Path) -> None:
    datalist = json.loads((cohort / "datalist.json").read_text())
    scan = cohort / datalist["training"][0]["image"]
    status = main(["preprocess", str(scan), str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "qc"),
                   "--quiet"])
    assert status == 1
    report = json.loads((tmp_path / "qc" / "summary.json").read_text())["scans"]
    assert [r["status"] for r in report] == ["ok", "failed"]
    assert "no such file" in report[1]["reason"]
    case = tmp_path / "qc" / scan.name.replace(".nii.gz", "")
    summary = json.loads((case / "summary.json").read_text())
    for key in ("shape", "spacing_mm", "lung_volume_ml", "timings_s", "peak_rss_mb"):
        assert key in summary
    assert set(summary["lung_volume_ml"]) == {"right", "left"}
    assert summary["lung_volume_ml"]["right"] > 0 and summary["lung_volume_ml"]["left"] > 0
    assert set(summary["timings_s"]) >= {"load", "body_crop", "lung_mask", "total"}
    assert (case / "montage.png").stat().st_size > 10_000


def test_outputs_on_the_input_grid(tmp_path: Path) -> None:
    """A NIfTI stored in RAS voxel order gets its masks back in RAS voxel order with the same affine."""
    phantom = make_phantom(1, shape=(64, 64, 16), seed=5)
    lps_affine = phantom_affine(phantom.spacing)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(phantom.image.shape[:2]) - 1
    ras_affine = lps_affine @ flip  # same physical space, x and y stored the other way round
    nib.save(nib.Nifti1Image(phantom.image[::-1, ::-1], ras_affine), tmp_path / "ras.nii.gz")
    assert main(["preprocess", str(tmp_path / "ras.nii.gz"), "--out", str(tmp_path / "qc"), "--quiet"]) == 0
    lungs = nib.load(tmp_path / "qc" / "ras" / "lungs.nii.gz")
    np.testing.assert_allclose(lungs.affine, ras_affine, atol=1e-4)
    truth = phantom.lungs[::-1, ::-1] > 0
    found = np.asarray(lungs.dataobj) > 0
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) >= 0.95


def test_crossval_subcommand_reaches_its_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["crossval", "--help"])
    assert info.value.code == 0
    assert "--bundle_root" in capsys.readouterr().out
