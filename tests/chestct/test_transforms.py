"""HU window, body crop, lung mask transform and crop to the lungs, on phantoms with known truth and on real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from chestct.constants import HU_WINDOW_MAX, HU_WINDOW_MIN, LUNG_LEFT, LUNG_RIGHT
from chestct.errors import ChestCTInputError
from chestct.io import load_ct
from chestct.phantoms import make_phantom, phantom_affine
from chestct.transforms import BodyCropd, CropToLungsd, HUWindowd, LoadCTd, LungMaskd


def _phantom_item(label: int = 1, task: str = "screening", seed: int = 0, shape=(96, 96, 24)) -> tuple[dict, object]:
    phantom = make_phantom(label, task=task, shape=shape, seed=seed)
    affine = torch.as_tensor(phantom_affine(phantom.spacing), dtype=torch.float64)
    image = MetaTensor(torch.from_numpy(phantom.image.astype(np.float32))[None], affine=affine)
    truth = MetaTensor(torch.from_numpy(phantom.lungs)[None], affine=affine)
    return {"image": image, "truth": truth}, phantom


@pytest.mark.parametrize(
    "hu, expected",
    [(HU_WINDOW_MIN, 0.0), (HU_WINDOW_MAX, 1.0), (-600.0, 0.5), (-3024.0, 0.0), (500.0, 1.0), (-900.0, 0.25)],
)
def test_hu_window_exact_values(hu: float, expected: float) -> None:
    out = HUWindowd(keys="image")({"image": torch.full((1, 2, 2, 2), hu)})["image"]
    assert torch.all(out == expected)


def test_hu_window_override_and_bad_window() -> None:
    out = HUWindowd(keys="image", hu_min=-1000.0, hu_max=400.0)({"image": torch.tensor([[-1000.0, -300.0]])})
    torch.testing.assert_close(out["image"], torch.tensor([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="hu_min=0"):
        HUWindowd(keys="image", hu_min=0, hu_max=-1200)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_body_crop_keeps_body_drops_table(seed: int) -> None:
    item, phantom = _phantom_item(seed=seed)
    out = BodyCropd(keys=["image", "truth"], min_size=0, margin_mm=0)(item)
    (x0, y0, z0), (x1, y1, z1) = out["image"].meta["body_box"]
    body = phantom.body.astype(bool)
    outside = body.copy()
    outside[x0:x1, y0:y1, z0:z1] = False
    assert not outside.any(), "the crop cut off part of the body"
    # the box is the body's own box: the table below the body is cut away ...
    truth_rows = np.flatnonzero(body.any(axis=(0, 2)))
    truth_columns = np.flatnonzero(body.any(axis=(1, 2)))
    assert (y0, y1, x0, x1) == (truth_rows[0], truth_rows[-1] + 1, truth_columns[0], truth_columns[-1] + 1)
    # ... and the table's sides that rise beside the body are not body
    table = (phantom.image > -500) & ~body
    assert table.any()
    found_body = out["body"][0].numpy().astype(bool)
    assert not (found_body & table[x0:x1, y0:y1, z0:z1]).any(), "the table counted as body"
    assert _dice(found_body, body[x0:x1, y0:y1, z0:z1]) >= 0.98
    assert out["image"].shape[1:] == out["truth"].shape[1:] == out["body"].shape[1:]
    assert (z0, z1) == (0, phantom.image.shape[2])
    # the crop moved the origin with it: the first kept voxel sits where it did in the input
    first_voxel = out["image"].affine.numpy() @ [0, 0, 0, 1]
    np.testing.assert_allclose(first_voxel, item["image"].affine.numpy() @ [x0, y0, 0, 1])


def test_body_crop_minimum_size_and_padding() -> None:
    item, phantom = _phantom_item(shape=(96, 96, 16))
    image = item["image"].clone()
    image[:, :6] = -3024.0  # scanner padding on one side
    out = BodyCropd(keys="image", min_size=80)({"image": image})
    assert out["image"].shape[1] >= 80 and out["image"].shape[2] >= 80
    assert float(out["image"][out["body"].bool()].min()) > -2000, "padding counted as body"
    assert BodyCropd(keys="image", min_size=500)({"image": image})["image"].shape[1:3] == (96, 96)


def test_body_crop_bad_arguments_and_empty_scan() -> None:
    with pytest.raises(ValueError, match="-1"):
        BodyCropd(keys="image", min_size=-1)
    with pytest.raises(ChestCTInputError, match="no body"):
        BodyCropd(keys="image")({"image": torch.full((1, 8, 8, 4), -1000.0)})


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.mark.parametrize("task, label, seed", [("screening", 1, 0), ("screening", 1, 1), ("severity", 0, 2),
                                               ("severity", 1, 3)])
def test_classical_lung_mask_matches_phantom_truth(task: str, label: int, seed: int) -> None:
    item, phantom = _phantom_item(label, task, seed)
    out = LungMaskd(keys="image")(BodyCropd(keys=["image", "truth"], min_size=0)(item))
    found, truth = out["lungs"][0].numpy(), out["truth"][0].numpy()
    assert _dice(found > 0, truth > 0) >= 0.95
    for side in (LUNG_RIGHT, LUNG_LEFT):
        assert _dice(found == side, truth == side) >= 0.9, f"lung {side} mislabelled"
    assert out["lungs"].dtype == torch.uint8


def test_crop_to_lungs_keeps_all_lung() -> None:
    item, _ = _phantom_item()
    item = LungMaskd(keys="image", body_key=None)(item)
    lungs_before = int((item["lungs"] > 0).sum())
    out = CropToLungsd(keys=["image", "lungs"], margin_mm=0)(item)
    assert int((out["lungs"] > 0).sum()) == lungs_before
    assert out["image"].shape == out["lungs"].shape
    lungs = out["lungs"][0].numpy() > 0
    for axis in range(3):  # tight box: every face touches the lung
        other = tuple(a for a in range(3) if a != axis)
        profile = lungs.any(axis=other)
        assert profile[0] and profile[-1]


def test_lung_mask_errors() -> None:
    with pytest.raises(ValueError, match="unknown lung mask method 'magic'"):
        LungMaskd(method="magic")
    empty = {"image": torch.full((1, 16, 16, 4), 40.0)}
    with pytest.raises(ChestCTInputError, match="no lungs"):
        LungMaskd(body_key=None)(empty)
    with pytest.raises(ChestCTInputError, match="empty"):
        CropToLungsd(keys="image")({"image": empty["image"], "lungs": torch.zeros((1, 16, 16, 4))})


def test_lung_mask_method_is_pluggable() -> None:
    item, _ = _phantom_item()
    calls = []

    def every_dark_voxel(hu: np.ndarray, spacing, body) -> np.ndarray:
        calls.append(spacing)
        return (hu < -500).astype(np.uint8)

    out = LungMaskd(method=every_dark_voxel, body_key=None)(item)
    assert calls and calls[0] == pytest.approx(item["image"].meta.get("spacing", calls[0]))
    assert torch.equal(out["lungs"][0], (item["image"][0] < -500).to(torch.uint8))


# -- real data -------------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_classical_lung_mask_on_real_ct_against_cip_reference(real_data: Path) -> None:
    item = LoadCTd(keys="image")({"image": real_data / "cip/ct-64.nrrd"})
    reference = load_ct(real_data / "cip/derived_ct-64_lungmask_from_10002K.nrrd", check_hu=False)[0].numpy()
    found = LungMaskd(body_key=None)(item)["lungs"][0].numpy()
    assert _dice(found > 0, reference > 0) >= 0.90
    assert _dice(found == LUNG_RIGHT, reference == 2) >= 0.90  # CIP codes: 2 right, 3 left
    assert _dice(found == LUNG_LEFT, reference == 3) >= 0.90


@pytest.mark.real_data
def test_classical_lung_voxel_count_on_lungmask_slices(real_data: Path) -> None:
    item = BodyCropd(keys="image")(LoadCTd(keys="image")({"image": real_data / "lungmask_slices"}))
    count = int((LungMaskd()(item)["lungs"] > 0).sum())
    assert abs(count - 101_288) <= 0.10 * 101_288, count


@pytest.mark.real_data
def test_body_crop_on_real_padding(real_data: Path) -> None:
    item = BodyCropd(keys="image")(LoadCTd(keys="image")({"image": real_data / "dcmqi_ct3slice"}))
    assert float(item["image"][item["body"].bool()].min()) > -2000
    assert min(item["image"].shape[1:3]) >= 256
