"""Bag builders, instance sampling, flips, collation and datalist helpers (synthetic tensors, no files but tmp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from chestct.bags import (
    LungPatchBagd,
    RandBagFlipd,
    RandomInstanceSampled,
    RecordGeometryd,
    SafeTransform,
    SliceBagd,
    collate_bags,
    list_scans,
    load_datalist,
)
from chestct.errors import ChestCTInputError


def _volume(shape=(40, 30, 12), seed=0):
    """A windowed image and lungs whose area grows with z (slice 0 has none, slice z has ~z*(...) pixels)."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((1, *shape), dtype=np.float32))
    lungs = torch.zeros((1, *shape), dtype=torch.uint8)
    for z in range(1, shape[2]):
        lungs[0, 5 : 5 + 2 * z, 3:20, z] = 1 if z % 2 else 2
    return {"image": image, "lungs": lungs, "label": 1}


@pytest.mark.parametrize("size,fraction", [(32, 0.0), (64, 0.5), (16, 1.0)])
def test_slice_bag_shapes_and_lung_fraction(size, fraction):
    d = SliceBagd(spatial_size=size, min_lung_fraction=fraction)(_volume())
    bag, idx = d["image"], d["slice_indices"]
    assert bag.shape == (idx.numel(), 1, size, size) and bag.dtype == torch.float32
    assert "lungs" not in d
    area = np.array([min(2 * z, 35) * 17 if z else 0 for z in range(12)])
    expected = np.flatnonzero((area > 0) & (area >= fraction * area.max()))
    assert idx.tolist() == expected.tolist()
    assert torch.all(d["lung_area_fraction"] >= fraction - 1e-6)


def test_slice_bag_content_and_max_instances():
    data = _volume()
    d = SliceBagd(spatial_size=30, min_lung_fraction=0.0, keep_lungs=True)(dict(data))
    # resizing (40, 30) -> (30, 30) keeps the mean closely; the bag slice i is the volume slice idx[i]
    z = int(d["slice_indices"][3])
    assert abs(float(d["image"][3].mean()) - float(data["image"][0, :, :, z].mean())) < 0.02
    assert d["lungs"].shape == d["image"].shape
    d = SliceBagd(spatial_size=8, min_lung_fraction=0.0, max_instances=4)(dict(data))
    assert d["slice_indices"].numel() == 4 and d["slice_indices"][0] == 1 and d["slice_indices"][-1] == 11


def test_slice_bag_errors():
    data = _volume()
    data["lungs"] = torch.zeros_like(data["lungs"])
    with pytest.raises(ChestCTInputError):
        SliceBagd()(data)
    with pytest.raises(ValueError, match="min_lung_fraction"):
        SliceBagd(min_lung_fraction=1.5)
    with pytest.raises(ValueError, match="spatial_size"):
        SliceBagd(spatial_size=0)


def test_geometry_records_crop_position():
    affine = torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0]))
    image = MetaTensor(torch.rand(1, 50, 40, 12), affine=affine, meta={"original_affine": affine})
    data = _volume()
    d = RecordGeometryd()({"image": image, "lungs": data["lungs"]})
    crop_affine = affine.clone()
    crop_affine[:3, 3] = torch.tensor([2.0 * 4, 2.0 * 6, 5.0 * 0])
    d["image"] = MetaTensor(torch.rand(1, 40, 30, 12), affine=crop_affine)
    d = SliceBagd(spatial_size=16)(d)
    assert d["geometry"]["input_shape"] == [50, 40, 12]
    assert d["geometry"]["crop_start"] == [4, 6, 0] and d["geometry"]["crop_shape"] == [40, 30, 12]


@pytest.mark.parametrize("patch,fraction", [(16, 0.3), (8, 0.6)])
def test_patch_bag_lung_fraction(patch, fraction):
    data = _volume()
    lungs = data["lungs"][0].numpy() > 0
    d = LungPatchBagd(patch_size=patch, spatial_size=32, min_lung_fraction=fraction)(data)
    n = d["image"].shape[0]
    assert d["image"].shape == (n, 1, 32, 32) and n > 0
    assert d["patch_boxes"].shape == (n, 4) and d["slice_indices"].shape == (n,)
    for z, (x0, y0, x1, y1), f in zip(d["slice_indices"], d["patch_boxes"], d["lung_area_fraction"]):
        real = lungs[x0:x1, y0:y1, int(z)].sum() / patch**2
        assert real >= fraction - 1e-6 and abs(real - float(f)) < 1e-6


def test_patch_bag_small_slices_and_no_patch():
    data = _volume(shape=(10, 12, 4))
    data["lungs"][:] = 1
    d = LungPatchBagd(patch_size=16, spatial_size=16, min_lung_fraction=0.3)(dict(data))
    assert d["image"].shape == (4, 1, 16, 16)  # one zero-padded patch per slice, 120/256 = 47 % lung
    with pytest.raises(ChestCTInputError):
        LungPatchBagd(patch_size=16, min_lung_fraction=0.9)(dict(data))


@pytest.mark.parametrize("n,k", [(10, 4), (4, 4), (3, 8)])
def test_random_instance_sampling(n, k):
    bag = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    data = {"image": bag, "slice_indices": torch.arange(n) + 100, "label": 0}
    sampler = RandomInstanceSampled(num_instances=k)
    sampler.set_random_state(0)
    out = sampler(data)
    assert out["image"].shape == (k, 1, 2, 2)
    picked = out["image"][:, 0, 0, 0].long()
    assert torch.equal(out["slice_indices"], picked + 100)  # indices follow the instances
    assert torch.all(picked[1:] >= picked[:-1])  # bag order kept
    if n >= k:
        assert picked.unique().numel() == k  # without replacement
    else:
        assert picked.unique().numel() <= n  # with replacement
    with pytest.raises(ValueError, match="num_instances"):
        RandomInstanceSampled(num_instances=0)


def test_flip():
    bag = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    flipper = RandBagFlipd(prob=1.0)
    out = flipper({"image": bag})["image"]
    assert torch.equal(out, bag.flip(dims=[2, 3]))
    out = RandBagFlipd(prob=0.0)({"image": bag})["image"]
    assert torch.equal(out, bag)
    out = RandBagFlipd(prob=1.0, spatial_axis=[1], per_instance=True)({"image": bag})["image"]
    assert torch.equal(out, bag.flip(dims=[3]))


def test_collate_pads_and_masks():
    items = [
        {"image": torch.ones(3, 1, 4, 4), "slice_indices": torch.tensor([1, 2, 3]), "label": 1, "case_id": "a",
         "geometry": {"x": 1}},
        {"image": torch.ones(5, 1, 4, 4) * 2, "slice_indices": torch.arange(5), "label": 0, "case_id": "b",
         "geometry": {"x": 2}},
    ]
    batch = collate_bags(items)
    assert batch["image"].shape == (2, 5, 1, 4, 4)
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.all(batch["image"][0, 3:] == 0) and torch.all(batch["image"][1] == 2)
    assert batch["slice_indices"][0].tolist() == [1, 2, 3, -1, -1]
    assert batch["label"].tolist() == [1, 0]
    assert batch["case_id"] == ["a", "b"] and batch["geometry"] == [{"x": 1}, {"x": 2}]


def test_safe_transform_reports_reason():
    def broken(d):
        raise RuntimeError("applying transform") from ChestCTInputError("/x.nii", "no lungs found")

    out = SafeTransform(broken)({"image": "/x.nii", "case_id": "x"})
    assert out["image"] is None and out["error"] == "no lungs found" and out["case_id"] == "x"
    batch = collate_bags([out])
    assert batch["image"] == [None] and batch["error"] == ["no lungs found"]


def test_datalists(tmp_path):
    entries = [{"image": f"images/c{i}.nii.gz", "label": i % 2, "fold": i % 3} for i in range(6)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    train = load_datalist(tmp_path / "datalist.json", exclude_folds=[0, 1])
    assert [c["case_id"] for c in train] == ["c2", "c5"]
    assert train[0]["image"] == str(tmp_path / "images" / "c2.nii.gz")
    assert [c["case_id"] for c in load_datalist(tmp_path / "datalist.json", folds=[0])] == ["c0", "c3"]
    with pytest.raises(ChestCTInputError):
        load_datalist(tmp_path / "datalist.json", folds=[7])
    scans = tmp_path / "scans"
    (scans / "dicom_series").mkdir(parents=True)
    (scans / "b.nii.gz").write_bytes(b"")
    (scans / "a.nrrd").write_bytes(b"")
    (scans / "notes.txt").write_text("x")
    assert [s["case_id"] for s in list_scans(scans)] == ["a", "b", "dicom_series"]
    assert len(list_scans(tmp_path)) == 6  # a folder with a datalist.json uses it
    with pytest.raises(ChestCTInputError):
        list_scans(tmp_path / "missing")
