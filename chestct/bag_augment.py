"""Random in-plane affine augmentation of patch bags (the output of :class:`chestct.patch_bags.RandomPatchBagd`).

Every patch of a bag gets its own small rotation, isotropic scaling and translation, applied alike to the image
patch (bilinear) and to its lobe labels (nearest neighbour), in one batched ``grid_sample`` call. Where a patch
covers a whole axial slice (small scans, or patches as large as the slice) random crops cannot vary it, and a
network shown the same few slices again and again learns the scans by heart; the affine jitter makes each view
new while keeping the anatomy (no flips: left and right lobes differ). Outside the source patch the image is
filled with ``pad_value`` and the labels with background.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from chestct.patch_bags import check_label_keys
from custom_nets.checks import check_in_range

__all__ = ["RandPatchAffined"]


class RandPatchAffined(Randomizable, MapTransform):
    """Random rotation, scaling and shift of every patch of a bag, the same for an image patch and its labels.

    Args:
        keys: keys of the bag: images of shape (N, C, P, P) and label maps of shape (N, P, P).
        label_keys: the keys among ``keys`` holding label maps (resampled by nearest neighbour). A label map whose
            values are all negative is a placeholder for a scan without labels and is left as it is.
        prob: probability that a patch is transformed (the others are returned unchanged), in [0, 1].
        rotate_range: largest rotation in radians (uniform in [-r, r]), in [0, pi].
        scale_range: largest relative change of size (factor uniform in [1 - s, 1 + s]), in [0, 0.5].
        translate_range: largest shift as a fraction of the patch side (uniform per axis), in [0, 0.5].
        pad_value: image value where a transformed patch looks outside the source patch (0.0 is the bottom of the
            HU window, i.e. air).
        allow_missing_keys: allow keys to be absent.

    Raises:
        ValueError: for a range or probability outside the bounds above, or label keys not among ``keys``.

    Example::

        augment = RandPatchAffined(keys=("image", "lobes"), rotate_range=0.26, scale_range=0.1)
        augment.set_random_state(seed=0)
        bag = augment(bag)  # bag["image"]: (N, 1, P, P), bag["lobes"]: (N, P, P), shapes unchanged
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "lobes"),
        label_keys: KeysCollection = ("lobes",),
        prob: float = 1.0,
        rotate_range: float = 0.26,
        scale_range: float = 0.1,
        translate_range: float = 0.05,
        pad_value: float = 0.0,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = check_label_keys(label_keys, self.keys)
        self.prob = check_in_range("prob", prob, 0.0, 1.0)
        self.rotate_range = check_in_range("rotate_range", rotate_range, 0.0, math.pi)
        self.scale_range = check_in_range("scale_range", scale_range, 0.0, 0.5)
        self.translate_range = check_in_range("translate_range", translate_range, 0.0, 0.5)
        self.pad_value = float(pad_value)
        self._theta: torch.Tensor | None = None

    def randomize(self, data: int | None = None) -> None:
        """Draws the affine of each of ``data`` patches: ``self._theta`` of shape (N, 2, 3), in the normalised
        coordinates of ``F.affine_grid`` (identity rows for the patches left unchanged)."""
        n = int(data or 0)
        angle = self.R.uniform(-self.rotate_range, self.rotate_range, n)
        scale = self.R.uniform(1.0 - self.scale_range, 1.0 + self.scale_range, n)
        shift = self.R.uniform(-self.translate_range, self.translate_range, (n, 2)) * 2.0  # [-1, 1] spans the side
        keep = self.R.uniform(size=n) >= self.prob
        angle[keep], scale[keep], shift[keep] = 0.0, 1.0, 0.0
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # output pixel -> source pixel: the inverse map
        theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1)
        self._theta = torch.as_tensor(theta, dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present or self.prob == 0.0:
            return d
        sizes = {int(d[k].shape[0]) for k in present}
        if len(sizes) != 1:
            raise ValueError(f"the keys {present} hold bags of different sizes {sorted(sizes)}.")
        self.randomize(sizes.pop())
        grids: dict[tuple, torch.Tensor] = {}  # one sampling grid per patch size and device, shared by the keys
        for key in present:
            d[key] = self._warp(d[key], key in self.label_keys, grids)
        return d

    def _warp(self, value: Any, is_label: bool, grids: dict[tuple, torch.Tensor]) -> Any:
        t = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        expected = 3 if is_label else 4
        if t.dim() != expected:
            kind = "(N, P, P) label maps" if is_label else "(N, C, P, P) image patches"
            raise ValueError(f"expected {kind}, got shape {list(t.shape)}.")
        if is_label and t.numel() and bool((t < 0).all()):
            return value  # placeholder of a scan without labels
        source = t[:, None].float() if is_label else t.float()
        where = (tuple(source.shape[-2:]), str(source.device))
        if where not in grids:
            theta = self._theta.to(source.device)  # type: ignore[union-attr]
            grids[where] = F.affine_grid(theta, [source.shape[0], 1, *source.shape[-2:]], align_corners=False)
        grid = grids[where]
        if is_label:
            out = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=False)
            return out[:, 0].round().to(t.dtype)
        # shift by pad_value so that the zero padding of grid_sample fills with pad_value
        out = F.grid_sample(source - self.pad_value, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False) + self.pad_value
        out = out.to(t.dtype) if t.is_floating_point() else out
        if isinstance(value, MetaTensor):
            return MetaTensor(out, meta=dict(value.meta))
        return out
