"""Tests of the synthetic chest CT phantoms and the cohort writer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from chestct.constants import (
    LOBE_LEFT_LOWER,
    LOBE_LEFT_UPPER,
    LOBE_RIGHT_LOWER,
    LOBE_RIGHT_MIDDLE,
    LOBE_RIGHT_UPPER,
    LUNG_LEFT,
    LUNG_RIGHT,
)
from chestct.phantoms import Phantom, generate_cohort, make_phantom, phantom_affine

SMALL = (96, 96, 24)
TINY = (48, 48, 12)
TRIVIAL_STAT_MAX_AUC = 0.85

CASES = [(1, "screening", 0), (0, "screening", 1), (1, "severity", 2), (0, "severity", 3)]


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUC (ties count half), folded to >= 0.5: how well the score separates the classes either way."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    auc = wins / (len(pos) * len(neg))
    return float(max(auc, 1.0 - auc))


@pytest.fixture(scope="module")
def phantoms() -> dict[tuple[int, str, int], Phantom]:
    return {case: make_phantom(case[0], task=case[1], shape=SMALL, seed=case[2]) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_shapes_dtypes_ranges(phantoms, case):
    ph = phantoms[case]
    for name, dtype in (
        ("image", np.int16),
        ("body", np.uint8),
        ("lungs", np.uint8),
        ("lobes", np.uint8),
        ("lesions", np.uint8),
    ):
        arr = getattr(ph, name)
        assert arr.shape == SMALL, name
        assert arr.dtype == dtype, name
    assert ph.image.max() < 1500
    padding = ph.info["padding_value"]
    if padding is None:
        assert ph.image.min() >= -1024
    else:
        assert padding in (-3024, -2048)
        assert ph.image.min() == padding
        assert ph.image[0, 0, 0] == padding  # corners lie outside the reconstruction circle
        assert np.all(ph.image[ph.body > 0] > padding)
    assert set(np.unique(ph.lungs)) == {0, LUNG_RIGHT, LUNG_LEFT}
    assert set(np.unique(ph.lobes)) == set(range(6))
    assert set(np.unique(ph.body)) == {0, 1}
    assert ph.label == case[0] and ph.info["task"] == case[1]
    sx, sy, sz = ph.spacing
    assert sx == sy and 300 <= sx * SMALL[0] <= 420 and 220 <= sz * SMALL[2] <= 320
    json.dumps(ph.info)  # JSON-serialisable
    for key in ("task", "seed", "lesion_fraction", "lesion_count", "lobes_involved", "padding_value", "effusion"):
        assert key in ph.info, key
    assert ph.info["seed"] == case[2] and ph.info["lesion_count"] >= 1
    assert ph.info["lesion_fraction"] == pytest.approx(ph.lesions.sum() / (ph.lungs > 0).sum(), abs=1e-4)
    assert set(ph.info["lobes_involved"]) <= {1, 2, 3, 4, 5} and ph.info["lobes_involved"]


@pytest.mark.parametrize("case", CASES)
def test_mask_consistency(phantoms, case):
    ph = phantoms[case]
    lungs, lobes, body = ph.lungs, ph.lobes, ph.body > 0
    np.testing.assert_array_equal(lobes > 0, lungs > 0)
    assert np.all(np.isin(lobes[lungs == LUNG_RIGHT], [LOBE_RIGHT_UPPER, LOBE_RIGHT_MIDDLE, LOBE_RIGHT_LOWER]))
    assert np.all(np.isin(lobes[lungs == LUNG_LEFT], [LOBE_LEFT_UPPER, LOBE_LEFT_LOWER]))
    # LPS order: the patient's right lung lies at low x.
    right_x = np.nonzero(lungs == LUNG_RIGHT)[0]
    left_x = np.nonzero(lungs == LUNG_LEFT)[0]
    assert right_x.max() < left_x.min()
    # The lungs do not touch (mediastinum between) and lie inside the body.
    assert not np.any(ndimage.binary_dilation(lungs == LUNG_RIGHT) & (lungs == LUNG_LEFT))
    assert np.all(body[lungs > 0])
    assert np.all(lungs[ph.lesions > 0] > 0)
    # Lobe anatomy: upper lobes above lower lobes on average; the middle lobe is anterior to the lower lobe.
    zc = {code: np.nonzero(lobes == code)[2].mean() for code in range(1, 6)}
    yc = {code: np.nonzero(lobes == code)[1].mean() for code in range(1, 6)}
    assert zc[LOBE_RIGHT_UPPER] > zc[LOBE_RIGHT_LOWER] and zc[LOBE_LEFT_UPPER] > zc[LOBE_LEFT_LOWER]
    assert yc[LOBE_RIGHT_MIDDLE] < yc[LOBE_RIGHT_LOWER] and yc[LOBE_LEFT_UPPER] < yc[LOBE_LEFT_LOWER]
    # Lung parenchyma is dark, the body wall is not.
    aerated = ph.lungs.astype(bool) & ~ph.lesions.astype(bool)
    assert np.median(ph.image[aerated]) < -600  # partial volume with lesions and vessels lifts it above -780
    assert np.median(ph.image[body & (ph.lungs == 0)]) > -200


@pytest.mark.parametrize("case", CASES)
def test_table_separate_from_body(phantoms, case):
    ph = phantoms[case]
    body = ph.body > 0
    # Outside the body only the table is denser than -500 HU (air and padding are far below it).
    table = (~body) & (ph.image > -500)
    assert table.sum() > 0
    # The table lies below the patient (high y, patient supine) and never touches the body.
    # The table is curved (a cradle), so compare column by column: in every x column it lies behind the body.
    ys = np.arange(body.shape[1])[None, :, None]
    table_top = np.where(table, ys, body.shape[1]).min(axis=1)
    body_back = np.where(body, ys, -1).max(axis=1)
    assert np.all(table_top > body_back)
    assert np.nonzero(table)[1].mean() > np.nonzero(body)[1].max()
    assert not np.any(ndimage.binary_dilation(body, iterations=1) & table)
    # The vertebral body (bone) is posterior: the densest body voxels lie behind the body's centre.
    bone_y = np.nonzero(body & (ph.image > 250))[1]
    body_y = np.nonzero(body)[1]
    assert np.median(bone_y) > body_y.mean()


def test_phantom_affine():
    aff = phantom_affine((0.7, 0.8, 2.5), (-10.0, -20.0, 5.0))
    np.testing.assert_allclose(aff[:3, :3], np.diag([-0.7, -0.8, 2.5]))
    np.testing.assert_allclose(aff[:3, 3], [10.0, 20.0, 5.0])
    # Voxel (1, 0, 0) is 0.7 mm toward the patient's left, i.e. toward -x in RAS.
    assert (aff @ [1, 0, 0, 1])[0] == pytest.approx(10.0 - 0.7)


def test_determinism():
    a = make_phantom(1, shape=TINY, seed=5, effusion_probability=0.5)
    b = make_phantom(1, shape=TINY, seed=5, effusion_probability=0.5)
    c = make_phantom(1, shape=TINY, seed=6, effusion_probability=0.5)
    for name in ("image", "body", "lungs", "lobes", "lesions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.info == b.info and a.spacing == b.spacing
    assert not np.array_equal(a.image, c.image)


def test_lesion_patterns_by_class():
    """COVID-like lesions are bilateral and ground glass, bacterial ones unilateral and dense, in most cases."""
    covid = [make_phantom(1, shape=TINY, seed=100 + i) for i in range(8)]
    bacterial = [make_phantom(0, shape=TINY, seed=200 + i) for i in range(8)]
    assert sum(p.info["bilateral"] for p in covid) >= 6
    assert sum(not p.info["bilateral"] for p in bacterial) >= 6
    covid_hu = np.median([np.median(p.image[p.lesions > 0]) for p in covid])
    bacterial_hu = np.median([np.median(p.image[p.lesions > 0]) for p in bacterial])
    assert -750 < covid_hu < -350
    assert -200 < bacterial_hu < 100


def test_no_trivial_statistic_separates_screening_classes():
    """Mean HU in body or lungs and the lesion burden alone must not solve the screening task."""
    labels, stats = [], []
    for i in range(30):
        label = i % 2
        ph = make_phantom(label, shape=SMALL, seed=1000 + i)
        body, lungs = ph.body > 0, ph.lungs > 0
        labels.append(label)
        stats.append((ph.image[body].mean(), ph.image[lungs].mean(), ph.info["lesion_fraction"]))
    labels_a, stats_a = np.array(labels), np.array(stats)
    aucs = [_auc(stats_a[:, j], labels_a) for j in range(stats_a.shape[1])]
    assert max(aucs) <= TRIVIAL_STAT_MAX_AUC, aucs


def test_severity_burden_decides_label():
    severe = [make_phantom(1, task="severity", shape=TINY, seed=300 + i) for i in range(4)]
    mild = [make_phantom(0, task="severity", shape=TINY, seed=400 + i) for i in range(4)]
    assert min(p.info["lesion_fraction"] for p in severe) > max(p.info["lesion_fraction"] for p in mild) * 0.8
    assert np.mean([p.info["lesion_fraction"] for p in severe]) > 2 * np.mean([p.info["lesion_fraction"] for p in mild])
    assert all(len(p.info["lobes_involved"]) >= 3 and p.info["bilateral"] for p in severe)


def test_effusion_is_fluid_inside_lung_mask():
    with_fluid = make_phantom(1, shape=SMALL, seed=7, effusion_probability=1.0)
    without = make_phantom(1, shape=SMALL, seed=7, effusion_probability=0.0)
    assert with_fluid.info["effusion"] and not without.info["effusion"]

    def dense_posterior_basal(ph: Phantom) -> int:
        lungs = ph.lungs > 0
        ys, zs = np.nonzero(lungs)[1], np.nonzero(lungs)[2]
        y_mid, z_mid = (ys.min() + ys.max()) / 2, (zs.min() + zs.max()) / 2
        region = lungs.copy()
        region[:, : int(y_mid)] = False
        region[:, :, int(z_mid) :] = False
        return int((region & (ph.image > -100) & (ph.lesions == 0)).sum())

    assert dense_posterior_basal(with_fluid) > 3 * dense_posterior_basal(without) + 20
    assert np.all(with_fluid.lesions[with_fluid.lungs == 0] == 0)


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"label": 2}, "2"),
        ({"task": "grading"}, "grading"),
        ({"shape": (31, 96, 24)}, "31"),
        ({"shape": (96, 96, 7)}, "7"),
        ({"shape": (96, 96)}, "96"),
        ({"effusion_probability": 1.5}, "1.5"),
        ({"burden": 0.0}, "0.0"),
    ],
)
def test_make_phantom_ill_arguments(kwargs, bad):
    args = {"label": 1, "shape": TINY} | kwargs
    with pytest.raises(ValueError, match=bad):
        make_phantom(**args)


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"num_cases": 0}, "0"),
        ({"task": "grading"}, "grading"),
        ({"image_format": "nrrd"}, "nrrd"),
        ({"shape": (16, 16, 16)}, "16"),
        ({"severe_fraction": 1.0}, "1.0"),
        ({"num_folds": 0}, "0"),
    ],
)
def test_generate_cohort_ill_arguments(tmp_path, kwargs, bad):
    args = {"out_dir": tmp_path, "num_cases": 2, "shape": TINY, "progress": False} | kwargs
    with pytest.raises(ValueError, match=bad):
        generate_cohort(**args)


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("task,num_cases,expected_positive", [("screening", 8, 4), ("severity", 10, 2)])
def test_generate_cohort(tmp_path, task, num_cases, expected_positive):
    path = generate_cohort(tmp_path / "a", num_cases, task=task, shape=(40, 40, 8), seed=3, num_folds=2, progress=False)
    datalist = json.loads(path.read_text())
    cases = datalist["training"]
    assert len(cases) == num_cases and datalist["task"] == task
    labels = np.array([c["label"] for c in cases])
    folds = np.array([c["fold"] for c in cases])
    assert labels.sum() == expected_positive
    assert labels.tolist() != sorted(labels.tolist()) or task == "severity"  # shuffled, not sorted by class
    for cls in (0, 1):  # stratified: each class split as evenly as possible over the folds
        counts = np.bincount(folds[labels == cls], minlength=2)
        assert counts.max() - counts.min() <= 1
    assert set(datalist["lobe_labels"]) == {"1", "2", "3", "4", "5"}
    first = cases[0]
    for key in ("image", "lungs", "lobes", "body", "lesions"):
        assert not Path(first[key]).is_absolute()
        assert (path.parent / first[key]).is_file()
    img = nib.load(str(path.parent / first["image"]))
    lobes = nib.load(str(path.parent / first["lobes"]))
    np.testing.assert_allclose(img.affine, lobes.affine)
    assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0 and img.affine[2, 2] > 0
    assert np.asarray(lobes.dataobj).dtype == np.uint8
    # Same seed: byte-identical files; other seed: different images.
    path_b = generate_cohort(
        tmp_path / "b", num_cases, task=task, shape=(40, 40, 8), seed=3, num_folds=2, progress=False
    )
    assert path.read_bytes() == path_b.read_bytes()
    for key in ("image", "lobes", "lesions"):
        assert (path.parent / first[key]).read_bytes() == (path_b.parent / first[key]).read_bytes()
    path_c = generate_cohort(tmp_path / "c", 2, task=task, shape=(40, 40, 8), seed=4, num_folds=2, progress=False)
    assert not np.array_equal(_read(path.parent / first["image"]), _read(path_c.parent / first["image"]))


def test_generate_cohort_dicom_matches_phantom(tmp_path):
    itk = pytest.importorskip("itk")
    nifti = generate_cohort(tmp_path / "n", 2, shape=(40, 40, 8), seed=9, progress=False)
    dicom = generate_cohort(tmp_path / "d", 2, shape=(40, 40, 8), seed=9, image_format="dicom", progress=False)
    case_n = json.loads(nifti.read_text())["training"][1]
    case_d = json.loads(dicom.read_text())["training"][1]
    assert case_d["image"] == "images/case_001" and case_n["info"] == case_d["info"]
    expected = _read(nifti.parent / case_n["image"])
    series = dicom.parent / case_d["image"]
    assert len(list(series.glob("*.dcm"))) == 8
    itk_image = itk.imread(str(series))
    arr = itk.array_view_from_image(itk_image)  # [z, y, x]
    np.testing.assert_array_equal(arr.transpose(2, 1, 0), expected)
    np.testing.assert_allclose(tuple(itk_image.GetSpacing()), case_n["info"]["spacing_mm"], rtol=1e-5)
    # Same seed: identical DICOM bytes (UIDs derived from the seed, no time stamps).
    again = generate_cohort(tmp_path / "d2", 2, shape=(40, 40, 8), seed=9, image_format="dicom", progress=False)
    for f in sorted(series.glob("*.dcm")):
        assert f.read_bytes() == (again.parent / case_d["image"] / f.name).read_bytes()
