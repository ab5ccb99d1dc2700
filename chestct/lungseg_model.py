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
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as error:
            raise ChestCTInputError(path, f"not a loadable TorchScript model ({error})") from error
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
            logits = self.model(batch)
            logits = F.interpolate(logits.float(), size=(width, height), mode="bilinear", align_corners=False)
            # max().indices: torch's argmax over the channel dimension is about 15x slower on the CPU
            labels[start:stop] = logits.max(dim=1).indices.to(torch.uint8).cpu().numpy()
        labels = labels.transpose(1, 2, 0)
        if body is not None:
            labels = labels * body.astype(bool)
        labels = np.ascontiguousarray(labels)
        return self._postprocess(labels) if self.postprocess else labels

    @staticmethod
    def _postprocess(labels: np.ndarray) -> np.ndarray:
        """Largest 3D component per lung and in-plane hole filling, computed inside the box of the labels."""
        cleaned = np.zeros_like(labels)
        box = bounding_box(labels > 0)
        if box is None:
            return cleaned
        # one voxel of margin keeps in-plane holes that touch the box edge distinguishable from the outside
        start = np.maximum(box[0] - 1, 0)
        end = np.minimum(box[1] + 1, labels.shape)
        region = tuple(slice(a, b) for a, b in zip(start, end))
        crop, out = labels[region], cleaned[region]
        for value in (1, 2):
            lung = keep_largest_component(crop == value)
            out[fill_holes_in_plane(lung) & (out == 0)] = value
        return cleaned
