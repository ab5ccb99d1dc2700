"""The ``model`` lung mask method: an exported (TorchScript) 2D lung segmenter run slice by slice.

The model contract, shared with the ``lung_ct_segmentation`` bundle that trains and exports it: input axial slices
``(B, 1, S, S)`` taken as ``hu[:, :, z]`` from the canonical LPS volume of :func:`chestct.io.load_ct` (rows = x,
columns = y), HU clipped to ``hu_window`` and scaled to [0, 1], resized to ``S x S``; output logits ``(B, 3, S, S)``
for background, right lung, left lung.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chestct.errors import ChestCTInputError
from chestct.masks import bounding_box, fill_holes_in_plane, keep_largest_component

__all__ = ["LUNGSEG_HU_WINDOW", "ModelLungMask", "default_model_path"]

# A wide window: consolidation and effusion (0..50 HU) must stay distinguishable from air and from each other.
LUNGSEG_HU_WINDOW: tuple[float, float] = (-1024.0, 600.0)
LUNGSEG_IMAGE_SIZE = 256
LUNGSEG_NUM_CLASSES = 3


def default_model_path() -> Path:
    """Where the lung segmentation bundle writes its exported model."""
    return Path(__file__).resolve().parents[1] / "bundles" / "lung_ct_segmentation" / "models" / "model.ts"


class ModelLungMask:
    """Lung labels from an exported 2D segmenter, batched over axial slices on the chosen device.

    Args:
        model_path: TorchScript file (default: the lung segmentation bundle's ``models/model.ts``).
        device: where to run (default: CUDA when available, else CPU).
        batch_size: slices per forward pass.
        image_size: the model's input size ``S`` (slices are resized to ``S x S`` and the logits back).
        hu_window: HU range mapped to [0, 1].
        postprocess: keep the largest 3D component of each lung and fill in-plane holes.

    Raises:
        ChestCTInputError: the model file is missing or cannot be loaded.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        image_size: int = LUNGSEG_IMAGE_SIZE,
        hu_window: Sequence[float] = LUNGSEG_HU_WINDOW,
        postprocess: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}.")
        if len(hu_window) != 2 or not hu_window[1] > hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window}.")
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise ChestCTInputError(
                path, "no lung segmentation model: train and export the lung_ct_segmentation bundle, "
                "or use the 'classical' lung mask method"
            )
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        try:
            model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as error:
            raise ChestCTInputError(path, f"not a loadable TorchScript model ({error})") from error
        self.model = _fold_for_inference(model)
        self.batch_size, self.image_size = batch_size, image_size
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.postprocess = postprocess

    @torch.inference_mode()
    def __call__(self, hu: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 body: np.ndarray | None = None) -> np.ndarray:
        """Labels ``(X, Y, Z)`` uint8 (0 background, 1 right, 2 left) for a HU volume ``(X, Y, Z)``."""
        if hu.ndim != 3:
            raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {hu.shape}.")
        width, height, depth = hu.shape
        low, high = self.hu_window
        labels = np.zeros((depth, width, height), dtype=np.uint8)
        for start in range(0, depth, self.batch_size):
            stop = min(start + self.batch_size, depth)
            # (B, 1, X, Y): a contiguous copy per batch, not a strided view through the whole volume
            slab = np.ascontiguousarray(hu[:, :, start:stop].transpose(2, 0, 1), dtype=np.float32)
            batch = torch.from_numpy(slab)[:, None].to(self.device)
            batch = (batch.clamp(low, high) - low) / (high - low)
            batch = F.interpolate(batch, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            logits = self.model(batch).float()
            box = _foreground_box(logits, (width, height))
            if box is not None:
                (x0, x1), (y0, y1) = box
                labels[start:stop, x0:x1, y0:y1] = _upsampled_labels(logits, (width, height), box).cpu().numpy()
        labels = labels.transpose(1, 2, 0)
        if body is not None:
            labels = labels * body.astype(bool)
        labels = np.ascontiguousarray(labels)
        return self._postprocess(labels) if self.postprocess else labels

    @staticmethod
    def _postprocess(labels: np.ndarray) -> np.ndarray:
        """Largest 3D component per lung and in-plane hole filling, each computed inside that lung's box."""
        cleaned = np.zeros_like(labels)
        for value in (1, 2):
            box = bounding_box(labels == value)
            if box is None:
                continue
            # one voxel of margin keeps in-plane holes that touch the box edge distinguishable from the outside
            start = np.maximum(box[0] - 1, 0)
            end = np.minimum(box[1] + 1, labels.shape)
            region = tuple(slice(a, b) for a, b in zip(start, end))
            lung = fill_holes_in_plane(keep_largest_component(labels[region] == value))
            out = cleaned[region]  # a view: writes land in ``cleaned``
            out[lung & (out == 0)] = value
        return cleaned


def _fold_for_inference(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Batch norm folded into the convolutions (about a third less CPU time); the model as loaded if that fails."""
    try:
        return torch.jit.optimize_for_inference(torch.jit.freeze(model))
    except Exception:  # noqa: BLE001 - an exotic export still runs, only slower
        return model


def _foreground_box(logits: torch.Tensor, size: tuple[int, int], margin: int = 2) -> tuple[tuple[int, int], ...] | None:
    """The full-resolution in-plane box that holds every lung pixel of a batch, from its low-resolution logits.

    A bilinear blend of logit vectors that all rank background first ranks it first too, so no full-resolution pixel
    outside the box of the low-resolution lung pixels (plus ``margin`` low-resolution pixels) can be lung.

    Args:
        logits: (B, C, S, S), class 0 = background.
        size: the full-resolution (X, Y).

    Returns:
        ``((x0, x1), (y0, y1))`` inclusive-exclusive, or ``None`` when no pixel is lung.
    """
    foreground = (logits.max(dim=1).indices > 0).any(dim=0)  # (S, S): lung in any slice of the batch
    box = []
    for along, full in zip((foreground.any(dim=1), foreground.any(dim=0)), size):
        hits = torch.nonzero(along).flatten()
        if hits.numel() == 0:
            return None
        coarse = along.numel()
        first = max(int(hits[0]) - margin, 0)
        last = min(int(hits[-1]) + 1 + margin, coarse)
        box.append((int(np.floor(first * full / coarse)), int(np.ceil(last * full / coarse))))
    return tuple(box)


def _upsampled_labels(logits: torch.Tensor, size: tuple[int, int], box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Labels of the full-resolution pixels in ``box``: bilinear logits (as ``F.interpolate`` with
    ``align_corners=False`` to ``size``), then the best class.

    ``grid_sample`` over the box alone samples exactly the points ``F.interpolate`` would and is several times
    faster on the CPU than interpolating the whole slice.

    Returns:
        uint8 labels, shape (B, x1 - x0, y1 - y0).
    """
    (x0, x1), (y0, y1) = box
    device = logits.device
    # normalised coordinates of pixel centres: -1 and 1 are the outer edges of the first and last pixel
    rows = (torch.arange(x0, x1, device=device, dtype=torch.float32) + 0.5) * (2.0 / size[0]) - 1.0
    cols = (torch.arange(y0, y1, device=device, dtype=torch.float32) + 0.5) * (2.0 / size[1]) - 1.0
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    grid = torch.stack([grid_cols, grid_rows], dim=-1)[None].expand(logits.shape[0], -1, -1, -1)
    sampled = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # max().indices: torch's argmax over the channel dimension is about 15x slower on the CPU
    return sampled.max(dim=1).indices.to(torch.uint8)
