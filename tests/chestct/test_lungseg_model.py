"""The ``model`` lung mask method: a TorchScript segmenter run slice-wise, batched, on the configured device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from chestct.cli import main
from chestct.errors import ChestCTInputError
from chestct.lungseg_model import ModelLungMask
from chestct.phantoms import make_phantom, phantom_affine
from chestct.transforms import LungMaskd


class _DarkIsLung(torch.nn.Module):
    """Stands in for the trained segmenter: dark pixels are lung, right or left by the image half they lie in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (x < 0.25).float()
        rows = torch.arange(x.shape[2], device=x.device).view(1, 1, -1, 1).float()
        right = dark * (rows < x.shape[2] / 2).float()  # low x (rows) is the patient's right
        left = dark - right
        return torch.cat([1.0 - dark, right, left], dim=1) * 10.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.ts"
    torch.jit.save(torch.jit.script(_DarkIsLung()), str(path))
    return path


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(1, task="severity", shape=(96, 96, 24), seed=4)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_model_mask_equals_the_model_applied_by_hand(model_path: Path, phantom) -> None:
    hu = phantom.image.astype(np.float32)
    labels = ModelLungMask(model_path, device="cpu", image_size=96)(hu, phantom.spacing, phantom.body)
    assert labels.shape == phantom.image.shape and labels.dtype == np.uint8
    scaled = (np.clip(hu, -1024, 600) + 1024) / 1624  # the default window
    dark = (scaled < 0.25) & phantom.body.astype(bool)
    by_hand = np.where(dark, np.where(np.arange(96)[:, None, None] < 48, 1, 2), 0).astype(np.uint8)
    np.testing.assert_array_equal(labels, ModelLungMask._postprocess(by_hand))
    # postprocessing keeps one component per lung, and the lungs end up on their own sides
    assert _dice(labels > 0, phantom.lungs > 0) >= 0.8
    assert np.nonzero(labels == 1)[0].mean() < np.nonzero(labels == 2)[0].mean()


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batching_does_not_change_the_result(model_path: Path, phantom, batch_size: int) -> None:
    hu = phantom.image.astype(np.float32)
    reference = ModelLungMask(model_path, device="cpu", batch_size=32, image_size=64)(hu, phantom.spacing)
    batched = ModelLungMask(model_path, device="cpu", batch_size=batch_size, image_size=64)(hu, phantom.spacing)
    np.testing.assert_array_equal(batched, reference)


def test_lung_mask_transform_takes_the_model(model_path: Path, phantom) -> None:
    affine = torch.as_tensor(phantom_affine(phantom.spacing))
    image = MetaTensor(torch.from_numpy(phantom.image.astype(np.float32))[None], affine=affine)
    transform = LungMaskd(method="model", body_key=None,
                          method_options={"model_path": model_path, "device": "cpu", "image_size": 64})
    lungs = transform({"image": image})["lungs"]
    assert lungs.shape == image.shape and set(np.unique(lungs.numpy())) == {0, 1, 2}


def test_missing_or_broken_model(tmp_path: Path) -> None:
    with pytest.raises(ChestCTInputError, match="lung_ct_segmentation"):
        ModelLungMask(tmp_path / "absent.ts")
    broken = tmp_path / "broken.ts"
    broken.write_bytes(b"not a model")
    with pytest.raises(ChestCTInputError, match="TorchScript"):
        ModelLungMask(broken)
    with pytest.raises(ValueError, match="0"):
        ModelLungMask(broken, batch_size=0)
    assert main(["preprocess", "x.nii.gz", "--out", str(tmp_path), "--lung-method", "model",
                 "--model-path", str(tmp_path / "absent.ts"), "--quiet"]) == 2


@pytest.mark.parametrize("size", [(96, 96), (100, 73), (512, 459)])
def test_upsampling_in_the_lung_box_equals_whole_slice_interpolation(size: tuple[int, int]) -> None:
    from chestct.lungseg_model import _foreground_box, _upsampled_labels

    generator = torch.Generator().manual_seed(0)
    logits = 0.5 * torch.randn(3, 3, 32, 32, generator=generator)
    logits[:, 0] += 4.0  # background wins except in two blobs
    logits[:, 1, 6:14, 8:15] += 8.0
    logits[1, 2, 20:27, 5:24] += 8.0
    whole = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    expected = whole.argmax(dim=1).to(torch.uint8)
    box = _foreground_box(logits, size)
    assert box is not None
    (x0, x1), (y0, y1) = box
    labels = torch.zeros_like(expected)
    labels[:, x0:x1, y0:y1] = _upsampled_labels(logits, size, box)
    assert int((expected > 0).sum()) > 0
    # the same labels, except where two classes tie to float rounding (grid_sample and interpolate round apart)
    top2 = whole.topk(2, dim=1).values
    differ = labels != expected
    assert bool(((top2[:, 0] - top2[:, 1]) < 1e-3)[differ].all()), int(differ.sum())
    assert int(differ.sum()) <= 2
    # the box holds the blobs and a margin, not the whole slice
    assert (x1 - x0) * (y1 - y0) < 0.6 * size[0] * size[1]


def test_no_lung_gives_no_box() -> None:
    from chestct.lungseg_model import _foreground_box

    logits = torch.zeros(2, 3, 16, 16)
    logits[:, 0] = 1.0
    assert _foreground_box(logits, (64, 64)) is None
