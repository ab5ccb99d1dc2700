"""The lung segmenter's 2D training set: slice preparation, reliability filter, augmentation, held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import chestct.lungseg_data as lsd
from chestct.lungseg_model import LUNGSEG_HU_WINDOW, LUNGSEG_IMAGE_SIZE


@pytest.mark.parametrize(
    "path, held_out",
    [
        ("/data/real/cip/ct-64.nrrd", True),
        ("/data/real/cip/ct-64Dicom/IMG0001.dcm", True),
        ("/data/real/cip/derived_ct-64_lungmask_from_10002K.nrrd", True),
        ("/data/real/cip/10002K_INSP_STD_BWH_COPD_leftLungRightLung.nrrd", True),
        ("/data/real/cip/lm-64.nrrd", True),
        ("/data/real/cip/wholeLung-64.nrrd", True),
        ("/data/real/cip/GeneratePartialLungLabelMap_Test_ct-64.nrrd", True),
        ("/data/real/lungmask_slices/0.dcm", True),
        ("/data/real/cip/crop_ct_2slices.nrrd", False),
        ("/data/real/totalsegmentator/example_ct_sm.nii.gz", False),
        ("/data/real/covid_ct_md/normal001", False),
    ],
)
def test_is_held_out(path: str, held_out: bool) -> None:
    assert lsd.is_held_out(path) is held_out


def test_load_refuses_held_out() -> None:
    with pytest.raises(ValueError, match="held-out"):
        lsd._load(Path("/anywhere/cip/ct-64.nrrd"))


def test_prepare_slices_matches_model_input() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500, 1500, size=(40, 30, 3)).astype(np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[5:15, 5:20] = 1
    labels[25:35, 5:20] = 2
    images, lab = lsd.prepare_slices(hu, labels)
    assert images.shape == lab.shape == (3, LUNGSEG_IMAGE_SIZE, LUNGSEG_IMAGE_SIZE)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(lab)) == {0, 1, 2}
    # right lung (low x = low rows) stays in the low rows
    rows_right = np.nonzero(lab[0] == 1)[0]
    rows_left = np.nonzero(lab[0] == 2)[0]
    assert rows_right.max() < rows_left.min()
    low, high = LUNGSEG_HU_WINDOW
    expected = torch.nn.functional.interpolate(
        ((torch.from_numpy(hu[:, :, 1]).clamp(low, high) - low) / (high - low))[None, None],
        size=(LUNGSEG_IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(images[1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="labels shape"):
        lsd.prepare_slices(hu, labels[:, :, :2])


def test_lobes_to_lungs() -> None:
    lobes = np.array([0, 4, 5, 6, 7, 8, 2, 3, 10, 12])
    np.testing.assert_array_equal(lsd.lobes_to_lungs(lobes, (4, 5, 6), (7, 8)), [0, 1, 1, 1, 2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(lsd.lobes_to_lungs(lobes, (12, 13, 14), (10, 11)), [0] * 8 + [2, 1])


def _two_lungs(depth: int = 20) -> np.ndarray:
    labels = np.zeros((100, 100, depth), np.uint8)
    labels[10:45, 20:80] = 1
    labels[55:90, 20:80] = 2
    return labels


def test_reliable_slices_filters() -> None:
    labels = _two_lungs()
    labels[55:90, 20:80, 8] = 0  # one lung missing
    labels[10:45, 20:80, 11] = 0
    labels[10:20, 20:30, 11] = 1  # implausible area ratio
    labels[:, :, 14] = 0
    labels[5:50, 10:90, 14] = 1  # disagrees with its neighbours
    labels[52:95, 10:90, 14] = 2
    keep = lsd.reliable_slices(labels, (1.0, 1.0, 1.0))
    for z in (8, 11, 14):
        assert z not in keep
    # apex and base (12 % of 20 slices = 3 at each end) are dropped
    assert min(keep) >= 3 and max(keep) <= 16
    assert {4, 5, 6, 16} <= set(keep)
    # a single slice: only the area checks
    assert lsd.reliable_slices(_two_lungs(1), (1.0, 1.0, 1.0)) == [0]
    assert lsd.reliable_slices(_two_lungs(1), (0.1, 0.1, 1.0)) == []  # lungs too small in mm^2


def test_rand_lung_flip_swaps_labels() -> None:
    image = torch.arange(16.0).view(1, 4, 4)
    label = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 2, 2]]], dtype=torch.uint8)
    out = lsd.RandLungFlipd(["image", "label"], prob=1.0)({"image": image, "label": label})
    torch.testing.assert_close(out["image"], torch.flip(image, (1,)))
    expected = torch.flip(label, (1,))
    expected = torch.where(expected == 1, 2, torch.where(expected == 2, 1, expected)).to(torch.uint8)
    torch.testing.assert_close(out["label"], expected)
    unchanged = lsd.RandLungFlipd(["image", "label"], prob=0.0)({"image": image, "label": label})
    torch.testing.assert_close(unchanged["label"], label)


def test_rand_resolution_keeps_shape() -> None:
    image = torch.rand(1, 64, 64)
    transform = lsd.RandResolutiond("image", min_size=8, max_size=16, prob=1.0)
    transform.set_random_state(0)
    out = transform({"image": image})["image"]
    assert out.shape == image.shape and not torch.equal(out, image)
    with pytest.raises(ValueError, match="min_size"):
        lsd.RandResolutiond("image", min_size=20, max_size=10)


def test_lung_metrics_by_hand() -> None:
    ref = np.zeros((10, 10, 2), np.uint8)
    ref[0:4, :, :] = 1  # 80 voxels
    ref[6:10, :, :] = 2  # 80 voxels
    pred = ref.copy()
    pred[3, :, :] = 0  # right loses 20 voxels
    m = lsd.lung_metrics(pred, ref, (1.0, 1.0, 2.0))
    assert m["dice_right"] == pytest.approx(2 * 60 / 140)
    assert m["dice_left"] == 1.0
    assert m["volume_error_ml_right"] == pytest.approx(-20 * 2.0 / 1000)
    assert m["hd95_mm_left"] == 0.0
    assert m["hd95_mm_right"] == pytest.approx(1.0)


def _fake_real_tree(root: Path) -> None:
    files = [
        "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz",
        "cip/crop_ct_2slices.nrrd", "cip/derived_crop_ct_2slices_lobes.nrrd",
        "cip/ct-64.nrrd", "cip/derived_ct-64_lungmask_from_10002K.nrrd", "cip/lm-64.nrrd",
        "cip/10002K_INSP_STD_BWH_COPD_leftLungRightLung.nrrd", "cip/ct-64Dicom/IMG0001.dcm",
        "lungmask_slices/0.dcm", "lungmask_slices/1.dcm", "dcmqi_ct3slice/01.dcm",
        "ny_sbu_slices/A000001/axial/19000101-001.dcm", "ny_sbu_slices/A000001/coronal/19000101-002.dcm",
    ]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "covid_ct_md" / "normal001").mkdir(parents=True)


def _fake_volume(path: Path) -> MetaTensor:
    """A chest-like HU slab (air, body, two dark lungs) or, for label files, lobe codes at the lungs."""
    hu = np.full((64, 64, 6), -1000.0, np.float32)
    hu[8:56, 12:52] = 40.0
    lobes = np.zeros(hu.shape, np.float32)
    right, left = (slice(14, 30), slice(18, 46)), (slice(34, 50), slice(18, 46))
    hu[right] = hu[left] = -850.0
    name = path.name
    if "seg" in name:
        lobes[right], lobes[left] = 12, 10
    elif "lobes" in name:
        lobes[right], lobes[left] = 5, 7
    data = lobes if ("seg" in name or "lobes" in name) else hu
    return MetaTensor(torch.from_numpy(data)[None], meta={"spacing": (5.0, 5.0, 5.0)})


def test_build_dataset_never_reads_held_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "real"
    _fake_real_tree(root)
    read: list[str] = []

    def fake_load(path, **kwargs):
        read.append(str(path))
        return _fake_volume(Path(path))

    monkeypatch.setattr(lsd, "load_ct", fake_load)
    datalist = lsd.build_dataset(tmp_path / "out", num_phantoms=2, num_val_phantoms=1, real_root=root,
                                 val_real=("sbu_A000001",))
    assert read, "no real source was read"
    assert not [p for p in read if lsd.is_held_out(p)]
    assert any("coronal" in p for p in read) is False  # only axial reformats
    listed = [item["image"] for split in ("training", "validation") for item in datalist[split]]
    assert not [p for p in listed if lsd.is_held_out(p)]
    sources = {item["source"] for item in datalist["training"]}
    assert {"phantom", "totalsegmentator", "cip_crop", "classical"} <= sources
    # the validation cases never appear in training
    train_cases = {item["case"] for item in datalist["training"]}
    val_cases = {item["case"] for item in datalist["validation"]}
    assert val_cases and not train_cases & val_cases
    assert any(c.startswith("sbu_A000001") for c in val_cases)
    # source weights are repetitions in the training list
    crop = [item for item in datalist["training"] if item["source"] == "cip_crop"]
    assert len(crop) == 6 * lsd.SOURCE_REPEATS["cip_crop"]
    on_disk = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert on_disk["summary"] == datalist["summary"]
    item = datalist["training"][0]
    image = np.load(tmp_path / "out" / item["image"])
    label = np.load(tmp_path / "out" / item["label"])
    assert image.shape == label.shape == (LUNGSEG_IMAGE_SIZE, LUNGSEG_IMAGE_SIZE)
    assert image.dtype == np.float16 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2}


def test_phantom_truth_includes_pathology() -> None:
    volume = next(lsd.phantom_volumes(1, seed=3))
    assert volume.source == "phantom" and volume.labels.shape == volume.hu.shape
    lung = volume.labels > 0
    dense = lung & (volume.hu > -300)  # consolidation, effusion (and vessels) are labelled lung
    assert dense.sum() > 0.02 * lung.sum()
    with pytest.raises(ValueError, match="phantom counts"):
        lsd.build_dataset("unused", num_phantoms=-1)
