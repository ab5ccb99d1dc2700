"""RandPatchAffined: image and labels moved alike, per-patch draws, placeholders and identity kept, ill arguments."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor

from chestct.bag_augment import RandPatchAffined


def _bag(n: int = 8, size: int = 32) -> dict:
    """Patches holding a bright rectangle whose pixels carry lobe label 3, off-centre so that rotations move it."""
    image = torch.zeros(n, 1, size, size)
    lobes = torch.zeros(n, size, size, dtype=torch.int64)
    image[:, :, 6:20, 9:27] = 1.0
    lobes[:, 6:20, 9:27] = 3
    return {"image": image, "lobes": lobes, "label": 1}


def test_image_and_labels_move_together():
    augment = RandPatchAffined(keys=("image", "lobes"), rotate_range=0.5, scale_range=0.2, translate_range=0.1)
    augment.set_random_state(seed=0)
    bag = _bag()
    out = augment(bag)
    assert out["image"].shape == bag["image"].shape and out["lobes"].shape == bag["lobes"].shape
    assert out["lobes"].dtype == torch.int64 and set(out["lobes"].unique().tolist()) <= {0, 3}
    moved = (out["lobes"] != bag["lobes"]).flatten(1).float().mean(1)
    assert (moved > 0.01).all()  # every patch changed (prob 1)
    assert len({round(v, 4) for v in moved.tolist()}) == len(moved)  # each patch its own transform
    # the label map follows the image: bright pixels are label 3 except along the blurred edges
    agree = ((out["image"][:, 0] > 0.5) == (out["lobes"] == 3)).float().mean()
    assert agree > 0.98
    assert out["label"] == 1  # other keys untouched


def test_same_seed_same_bag_and_identity_without_ranges():
    first, second = (RandPatchAffined(keys=("image", "lobes")) for _ in range(2))
    first.set_random_state(seed=3)
    second.set_random_state(seed=3)
    a, b = first(_bag()), second(_bag())
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["lobes"], b["lobes"])
    still = RandPatchAffined(keys=("image", "lobes"), rotate_range=0.0, scale_range=0.0, translate_range=0.0)
    out = still(_bag())
    torch.testing.assert_close(out["image"], _bag()["image"], atol=1e-5, rtol=0)
    assert torch.equal(out["lobes"], _bag()["lobes"])


def test_probability_zero_returns_the_bag_as_it_is():
    bag = _bag()
    out = RandPatchAffined(keys=("image", "lobes"), prob=0.0)(bag)
    assert out["image"] is bag["image"] and out["lobes"] is bag["lobes"]


def test_partial_probability_leaves_some_patches_alone():
    augment = RandPatchAffined(keys=("image", "lobes"), prob=0.5, rotate_range=0.5)
    augment.set_random_state(seed=1)
    bag = _bag(n=64)
    out = augment(bag)
    changed = (out["lobes"] != bag["lobes"]).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48


def test_placeholder_labels_and_pad_value_and_meta():
    bag = _bag()
    bag["lobes"] = torch.full_like(bag["lobes"], -1)  # a scan without lobe labels
    bag["image"] = MetaTensor(bag["image"] - 0.5, meta={"filename_or_obj": "scan.nii.gz"})
    augment = RandPatchAffined(keys=("image", "lobes"), rotate_range=math.pi / 4, pad_value=-0.5)
    augment.set_random_state(seed=0)
    out = augment(bag)
    assert torch.equal(out["lobes"], bag["lobes"])
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "scan.nii.gz"
    # corners rotated in from outside the patch hold pad_value, never the zero of grid_sample's padding
    assert out["image"].min() >= -0.5 - 1e-5 and out["image"][:, 0, 0, 0].allclose(torch.tensor(-0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prob": 1.5}, "1.5"),
        ({"rotate_range": -0.1}, "-0.1"),
        ({"scale_range": 0.9}, "0.9"),
        ({"translate_range": True}, "translate_range"),
        ({"label_keys": ("mask",)}, "mask"),
    ],
)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandPatchAffined(keys=("image", "lobes"), **kwargs)


def test_ill_bags():
    augment = RandPatchAffined(keys=("image", "lobes"))
    with pytest.raises(ValueError, match="different sizes"):
        augment({"image": torch.zeros(4, 1, 16, 16), "lobes": torch.zeros(3, 16, 16, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"\(N, C, P, P\)"):
        augment({"image": torch.zeros(4, 16, 16)})
