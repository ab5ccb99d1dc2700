"""Patch bags for M2UNet (He et al., arXiv 2005.03832): random 2D patches, severe-case oversampling, full-slice lobes.

A CT scan is a bag of ``n`` random 2D patches (n = 200, 128 x 128), each cut from one axial slice of the body-cropped,
HU-windowed volume, without resampling (the paper keeps each scanner's own spacing). The same crops are cut from the
lobe label map when the scan has one. Patches are random at test time too (a centre crop would show mostly the
trachea and mediastinum), so evaluation may draw several bags per scan and average the predictions.

- :class:`RandomPatchBagd`: the bag builder (MONAI dictionary transform, seeded through ``set_random_state``).
- :func:`severity_oversampling_weights`, :func:`severity_oversampling_sampler`, :func:`oversample_cases`: balance
  severe and non-severe scans in training (by weights, or by duplicating severe cases as the paper does; the random
  crops make the duplicates differ).
- :func:`segment_volume_slices`: lobe segmentation of whole axial slices with MONAI's ``SlidingWindowInferer``,
  stitched into a lobe label volume on the input grid; :func:`lobe_volumes_ml` measures each lobe in mL.

Voxel order is that of :func:`chestct.io.load_ct`: ``(C, X, Y, Z)``, axis ``Z`` (the last) is axial.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform, Randomizable
from torch.utils.data import WeightedRandomSampler

from chestct.constants import LOBE_NAMES
from chestct.errors import ChestCTInputError
from custom_nets.checks import check_in_range, check_positive_int

__all__ = [
    "RandomPatchBagd",
    "lobe_volumes_ml",
    "oversample_cases",
    "segment_volume_slices",
    "severity_oversampling_sampler",
    "severity_oversampling_weights",
]

# M2UNet's bag: 200 patches of 128 x 128 pixels (the paper's Table VI: 200 best, at least 100 needed).
DEFAULT_NUM_PATCHES: int = 200
DEFAULT_PATCH_SIZE: int = 128
# A patch must show at least this share of body (the rest is air outside the patient).
DEFAULT_MIN_BODY_FRACTION: float = 0.5


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_label_keys(label_keys: KeysCollection, keys: Sequence[Hashable]) -> tuple[Hashable, ...]:
    """``label_keys`` as a tuple (a single string is one key), checked to be among a transform's ``keys``.

    Raises:
        ValueError: naming the label keys that are not among ``keys``.
    """
    label_keys_t = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
    unknown = [k for k in label_keys_t if k not in keys]
    if unknown:
        raise ValueError(f"label_keys must be among keys {tuple(keys)}, got {unknown}.")
    return label_keys_t


def _source_name(image: Any) -> str | None:
    return image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None


class RandomPatchBagd(Randomizable, MapTransform):
    """Cut a bag of random axial patches from a body-cropped, HU-windowed CT (and the same crops from its lobes).

    Each patch is ``patch_size`` x ``patch_size`` pixels of one axial slice ``z``, at in-plane origin ``(x, y)`` (the
    voxel at the patch's pixel ``(0, 0)``). Patch centres are drawn uniformly over the body voxels of the whole
    volume (a slice is chosen with probability proportional to its body area, then a body pixel in it), the patch is
    shifted to lie inside the image, and it is kept only when at least ``min_body_fraction`` of its pixels are body;
    otherwise it is drawn again, up to ``max_tries`` times, after which the candidate with the most body is kept (its
    fraction is reported in ``patch_body_fraction``). Without a body mask the origins are uniform over the image.

    The volume is not resampled. An image smaller than ``patch_size`` in-plane is padded symmetrically: images with
    ``pad_value`` (0 = -1200 HU, i.e. air, after :class:`~chestct.transforms.HUWindowd`), label maps with 0
    (background), the body with 0; origins then lie partly outside the image (negative ``x`` or ``y``) and the
    pixels outside it hold the padding.

    Output, for ``N = num_patches`` and ``P = patch_size``:

    - each image key (in ``keys`` but not in ``label_keys``): float32 ``(N, 1, P, P)``, a MetaTensor carrying the
      input's meta (file name, affine of the volume) when the input is one;
    - each label key present: a plain int64 tensor ``(N, P, P)`` (the layout that
      :class:`custom_nets.losses.multitask.M2UNetLoss` takes), and ``has_<key>`` = True; a label key absent from
      the input gives ``has_<key>`` = False and no output, or, with ``missing_label_value`` set (e.g. -1, the
      loss's ``ignore_index``), a ``(N, P, P)`` map filled with it, so that scans with and without lobes collate
      into one mini-batch;
    - ``origins_key``: int64 ``(N, 3)``, rows ``(z, x, y)`` in the input voxel grid: patch pixel ``(i, j)`` is voxel
      ``(x + i, y + j, z)``, which the input affine (kept in the output MetaTensor's meta) maps to patient space;
    - ``body_fraction_key``: float32 ``(N,)``, the share of body in each patch (NaN without a body mask).

    The body mask (``body_key``) is removed from the output unless ``keep_body`` is set, so that bags of scans of
    different sizes collate.

    With ``num_draws`` > 1 the transform returns a list of ``num_draws`` independent bags of the same scan (MONAI's
    multi-sample convention, as ``RandSpatialCropSamplesd``), each carrying ``draw_key`` = its index: with a
    DataLoader of one scan per batch and ``list_data_collate`` a batch holds the draws of one scan, whose predicted
    probabilities can be averaged (the paper's test-time random cropping; report the number of draws).

    Args:
        keys: keys to cut patches from; all must share the spatial shape (X, Y, Z) of the first present key.
        num_patches: patches per bag ``N`` (the paper: 200).
        patch_size: in-plane patch size ``P`` in pixels (the paper: 128; M2UNet needs a multiple of 16).
        body_key: key of the body mask ``(1, X, Y, Z)`` (from :class:`~chestct.transforms.BodyCropd`), or ``None``.
        min_body_fraction: minimum share of body pixels in a patch, in [0, 1].
        max_tries: draws per patch before keeping the best candidate.
        pad_value: fill value of image keys outside the image.
        label_keys: the keys among ``keys`` holding label maps (cut the same way, returned as int64 without a
            channel axis).
        missing_label_value: fill value of an absent label key, or ``None`` to output nothing for it.
        origins_key: output key of the patch origins.
        body_fraction_key: output key of the body fraction of each patch.
        num_draws: bags drawn per call; > 1 returns a list of dictionaries.
        draw_key: output key of the draw index (only with ``num_draws`` > 1).
        keep_body: keep ``body_key`` in the output.
        allow_missing_keys: allow keys (typically ``"lobes"``) to be absent; at least one image key must be present.

    Raises:
        ValueError: for an argument outside the ranges above (the message names the bad value).
        ChestCTInputError: at call time, for an empty body mask, no image key, or keys of different spatial shapes.

    Example::

        bagger = RandomPatchBagd(keys=("image", "lobes"), num_patches=200, patch_size=128)
        bagger.set_random_state(seed=0)
        out = bagger({"image": image, "lobes": lobes, "body": body})   # image, lobes, body: (1, X, Y, Z)
        out["image"].shape  # (200, 1, 128, 128); out["lobes"]: (200, 128, 128); out["patch_origins"]: (200, 3)
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "lobes"),
        num_patches: int = DEFAULT_NUM_PATCHES,
        patch_size: int = DEFAULT_PATCH_SIZE,
        body_key: str | None = "body",
        min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION,
        max_tries: int = 20,
        pad_value: float = 0.0,
        label_keys: KeysCollection = ("lobes",),
        missing_label_value: int | None = None,
        origins_key: str = "patch_origins",
        body_fraction_key: str = "patch_body_fraction",
        num_draws: int = 1,
        draw_key: str = "draw",
        keep_body: bool = False,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        for name, value in (("num_patches", num_patches), ("patch_size", patch_size), ("max_tries", max_tries),
                            ("num_draws", num_draws)):
            check_positive_int(name, value)
        check_in_range("min_body_fraction", min_body_fraction, 0.0, 1.0)
        if missing_label_value is not None and not _is_int(missing_label_value):
            raise ValueError(f"missing_label_value must be an integer or None, got {missing_label_value!r}.")
        label_keys_t = check_label_keys(label_keys, self.keys)
        if all(k in label_keys_t for k in self.keys):
            raise ValueError(
                f"keys must hold at least one image key besides label_keys {label_keys_t}, got {self.keys}."
            )
        self.num_patches, self.patch_size = int(num_patches), int(patch_size)
        self.body_key, self.min_body_fraction, self.max_tries = body_key, float(min_body_fraction), int(max_tries)
        self.pad_value, self.label_keys = float(pad_value), label_keys_t
        self.missing_label_value = None if missing_label_value is None else int(missing_label_value)
        self.origins_key, self.body_fraction_key = origins_key, body_fraction_key
        self.num_draws, self.draw_key, self.keep_body = int(num_draws), draw_key, keep_body
        self._origins: np.ndarray | None = None
        self._fractions: np.ndarray | None = None

    # ------------------------------------------------------------------ randomisation

    def randomize(self, data: np.ndarray | tuple[int, int, int] | None = None) -> None:
        """Draw the patch origins into ``self._origins`` (N, 3) and their body fractions into ``self._fractions``.

        Args:
            data: the padded body mask, bool ``(X', Y', Z)``, or the padded spatial shape ``(X', Y', Z)`` when there
                is no body mask (uniform origins).
        """
        p, n = self.patch_size, self.num_patches
        if data is None:
            raise ValueError("randomize needs the body mask or the spatial shape.")
        if not isinstance(data, np.ndarray):
            sx, sy, sz = (int(s) for s in data)
            z = self.R.randint(0, sz, size=n)
            x = self.R.randint(0, sx - p + 1, size=n)
            y = self.R.randint(0, sy - p + 1, size=n)
            self._origins = np.stack([z, x, y], axis=1).astype(np.int64)
            self._fractions = np.full(n, np.nan, dtype=np.float32)
            return
        body = data
        sx, sy, _ = body.shape
        # every p x p window of every slice, as a view: the body fraction of a batch of candidates is one gather
        windows = np.lib.stride_tricks.sliding_window_view(body, (p, p), axis=(0, 1))  # (X'-p+1, Y'-p+1, Z, p, p)
        sample = self._body_voxel_sampler(body)

        def candidates(m: int) -> tuple[np.ndarray, np.ndarray]:
            """``m`` candidate origins (m, 3) as (z, x, y) and their body fractions (m,)."""
            centres = sample(m)
            x0 = np.clip(centres[:, 0] - p // 2, 0, sx - p)
            y0 = np.clip(centres[:, 1] - p // 2, 0, sy - p)
            zs = centres[:, 2]
            fraction = windows[x0, y0, zs].mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
            return np.stack([zs, x0, y0], axis=1), fraction

        origins, fractions = candidates(n)
        pending = np.flatnonzero(fractions < self.min_body_fraction)
        tries = self.max_tries - 1
        if len(pending) and tries:
            # The remaining tries of the patches short of body, drawn at once (a loop of tries costs milliseconds per
            # bag where a slice can never reach the fraction, e.g. a patch as large as the slice): each keeps its
            # first candidate with enough body, else the one with the most.
            more, more_fractions = candidates(len(pending) * tries)
            more, more_fractions = more.reshape(len(pending), tries, 3), more_fractions.reshape(len(pending), tries)
            enough = more_fractions >= self.min_body_fraction
            pick = np.where(enough.any(axis=1), enough.argmax(axis=1), more_fractions.argmax(axis=1))
            rows = np.arange(len(pending))
            better = more_fractions[rows, pick] > fractions[pending]
            origins[pending[better]] = more[rows, pick][better]
            fractions[pending[better]] = more_fractions[rows, pick][better]
        self._origins, self._fractions = origins, fractions

    def _body_voxel_sampler(self, body: np.ndarray) -> Callable[[int], np.ndarray]:
        """A function drawing ``m`` voxels uniformly among the body voxels, as an int64 array (m, 3) of (x, y, z).

        Uniform over body voxels is the same as a slice chosen in proportion to its body area and then a body pixel
        of that slice. Draws are uniform in the body's bounding box and kept when inside the body (the body fills
        most of its box in CT, so this avoids listing the voxels of every slice); a body too sparse in its box is
        listed once instead.
        """
        box = [np.flatnonzero(body.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        lo = np.array([b[0] for b in box])
        hi = np.array([b[-1] + 1 for b in box])
        crop = body[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        count = int(crop.sum())
        if count < 0.1 * crop.size:
            listed = np.argwhere(crop)
            return lambda m: listed[self.R.randint(count, size=m)] + lo
        acceptance = count / crop.size

        def sample(m: int) -> np.ndarray:
            kept: list[np.ndarray] = []
            while m > 0:
                candidates = self.R.randint(lo, hi, size=(int(m / acceptance * 1.2) + 8, 3))
                candidates = candidates[body[candidates[:, 0], candidates[:, 1], candidates[:, 2]]][:m]
                kept.append(candidates)
                m -= len(candidates)
            return np.concatenate(kept).astype(np.int64)

        return sample

    # ------------------------------------------------------------------ application

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        d = dict(data)
        present = list(self.key_iterator(d))
        image_keys = [k for k in present if k not in self.label_keys]
        if not image_keys:
            raise ChestCTInputError(None, f"no image key among {self.keys} in the input (keys: {list(d)}).")
        reference = d[image_keys[0]]
        shape = tuple(int(s) for s in reference.shape[1:])
        if len(shape) != 3:
            raise ChestCTInputError(
                _source_name(reference), f"expected a (1, X, Y, Z) volume, got shape {list(reference.shape)}."
            )
        for key in present:
            if tuple(int(s) for s in d[key].shape[1:]) != shape:
                raise ChestCTInputError(
                    _source_name(reference),
                    f"{key!r} has spatial shape {list(d[key].shape[1:])}, expected {list(shape)} as {image_keys[0]!r}.",
                )
        p = self.patch_size
        pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s in shape[:2]] + [(0, 0)]
        padded_shape = tuple(s + a + b for s, (a, b) in zip(shape, pad))

        body: np.ndarray | None = None
        if self.body_key is not None and self.body_key in d:
            body_t = d[self.body_key]
            if tuple(int(s) for s in body_t.shape[-3:]) != shape:
                raise ChestCTInputError(
                    _source_name(reference),
                    f"body mask {self.body_key!r} has shape {list(body_t.shape)}, expected {list(shape)}.",
                )
            body = np.asarray(body_t).reshape(shape) > 0
            if not body.any():
                raise ChestCTInputError(_source_name(reference), "the body mask is empty: no patch can be placed.")
            if any(a or b for a, b in pad):
                body = np.pad(body, pad, constant_values=False)

        sources = {key: self._padded(d[key], pad, key in self.label_keys) for key in present}
        draws = []
        for draw in range(self.num_draws):
            self.randomize(body if body is not None else padded_shape)
            out = dict(d)
            if not self.keep_body and self.body_key is not None:
                out.pop(self.body_key, None)
            assert self._origins is not None and self._fractions is not None
            for key in present:
                out[key] = self._cut(sources[key], d[key], key in self.label_keys)
            for key in self.label_keys:
                out[f"has_{key}"] = key in present
                if key not in present and self.missing_label_value is not None:
                    out[key] = torch.full((self.num_patches, p, p), self.missing_label_value, dtype=torch.int64)
            origins = self._origins.copy()
            origins[:, 1] -= pad[0][0]
            origins[:, 2] -= pad[1][0]
            out[self.origins_key] = torch.from_numpy(origins)
            out[self.body_fraction_key] = torch.from_numpy(self._fractions.copy())
            if self.num_draws > 1:
                out[self.draw_key] = draw
            draws.append(out)
        return draws if self.num_draws > 1 else draws[0]

    def _padded(self, volume: Any, pad: list[tuple[int, int]], is_label: bool) -> torch.Tensor:
        """``volume`` (1, X, Y, Z) as a plain (X', Y', Z) tensor padded in-plane to at least the patch size."""
        t = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(np.asarray(volume))
        t = t.reshape(t.shape[-3:])  # the dtype is converted per patch in _cut, not for the whole volume
        if any(a or b for a, b in pad):
            t = t.to(torch.int64) if is_label else t.to(torch.float32)
            value = 0 if is_label else self.pad_value
            # F.pad pads the last axes first: (z, z, y, y, x, x).
            t = torch.nn.functional.pad(t, (0, 0, pad[1][0], pad[1][1], pad[0][0], pad[0][1]), value=value)
        return t

    def _cut(self, source: torch.Tensor, original: Any, is_label: bool) -> torch.Tensor:
        """The patches of ``source`` (X', Y', Z) at ``self._origins``: (N, P, P) plain label tensors (so that real and
        placeholder lobe maps collate together) or (N, 1, P, P) images, MetaTensors when ``original`` is one."""
        p = self.patch_size
        assert self._origins is not None
        patches = torch.stack([source[x : x + p, y : y + p, z] for z, x, y in self._origins.tolist()])
        if is_label:
            return patches.to(torch.int64)
        patches = patches.to(torch.float32)
        patches = patches[:, None]
        if isinstance(original, MetaTensor):
            meta = dict(original.meta)
            meta["affine"] = original.affine.clone()
            return MetaTensor(patches, meta=meta)
        return patches


# ---------------------------------------------------------------------------------------------- oversampling


def _binary_labels(labels: Sequence[int] | np.ndarray | torch.Tensor, positive: int) -> np.ndarray:
    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if array.size == 0:
        raise ValueError("labels must not be empty.")
    return array == positive


def severity_oversampling_weights(
    labels: Sequence[int] | np.ndarray | torch.Tensor, target_fraction: float = 0.5, positive: int = 1
) -> torch.Tensor:
    """Per-case sampling weights that draw severe cases with probability ``target_fraction``.

    Each severe case weighs ``target_fraction / n_severe`` and each non-severe one
    ``(1 - target_fraction) / n_non_severe``, rescaled to a mean of 1. When one class is absent the weights are
    uniform (with a warning): nothing can be balanced.

    Args:
        labels: case labels, shape (num_cases,).
        target_fraction: expected share of severe cases among the draws, in (0, 1); 0.5 balances the classes.
        positive: the label of the oversampled class (1 = severe).

    Returns:
        float64 tensor (num_cases,), for ``torch.utils.data.WeightedRandomSampler``.
    """
    fraction = check_in_range("target_fraction", target_fraction, 0.0, 1.0, low_open=True, high_open=True)
    pos = _binary_labels(labels, positive)
    n_pos, n = int(pos.sum()), pos.size
    if n_pos in (0, n):
        warnings.warn(
            f"oversampling needs both classes, got {n_pos} of {n} cases with label {positive}: uniform.", stacklevel=2
        )
        return torch.ones(n, dtype=torch.float64)
    weights = np.where(pos, fraction / n_pos, (1.0 - fraction) / (n - n_pos))
    return torch.from_numpy(weights * n / weights.sum())


def severity_oversampling_sampler(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    target_fraction: float = 0.5,
    num_samples: int | None = None,
    positive: int = 1,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` (with replacement) drawing severe cases with probability ``target_fraction``.

    Args:
        labels: case labels in dataset order, shape (num_cases,).
        target_fraction: expected share of severe cases per epoch, in (0, 1).
        num_samples: draws per epoch (default: the number of cases).
        positive: the label of the oversampled class.
        generator: torch generator for reproducible epochs.
    """
    weights = severity_oversampling_weights(labels, target_fraction, positive)
    if num_samples is None:
        num_samples = len(weights)
    num_samples = check_positive_int("num_samples", num_samples)
    return WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=generator)


def oversample_cases(
    cases: Sequence[Mapping[str, Any]], target_fraction: float = 0.5, label_key: str = "label", positive: int = 1
) -> list[Mapping[str, Any]]:
    """Repeat the severe cases of a datalist so that they make about ``target_fraction`` of it (the paper's scheme).

    Each severe case appears ``r = max(1, round(target_fraction / (1 - target_fraction) * n_non_severe /
    n_severe))`` times, right after itself, and every non-severe case once; the DataLoader shuffles. The repeats
    are the same dictionaries: the random patch bags make their inputs differ. Usable in a bundle config:
    ``"$chestct.patch_bags.oversample_cases(@train_cases)"``.

    Args:
        cases: datalist entries, each with ``label_key``.
        target_fraction: wanted share of severe cases, in (0, 1).
        label_key: key of the case label.
        positive: the label of the repeated class.

    Returns:
        the new list (the input when a class is absent, with a warning).
    """
    fraction = check_in_range("target_fraction", target_fraction, 0.0, 1.0, low_open=True, high_open=True)
    missing = [i for i, c in enumerate(cases) if label_key not in c]
    if missing:
        raise ValueError(f"cases {missing[:5]} have no {label_key!r} key.")
    pos = _binary_labels([int(c[label_key]) for c in cases], positive)
    n_pos, n = int(pos.sum()), pos.size
    if n_pos in (0, n):
        warnings.warn(
            f"oversampling needs both classes, got {n_pos} of {n} cases with label {positive}: unchanged.", stacklevel=2
        )
        return list(cases)
    repeats = max(1, round(fraction / (1.0 - fraction) * (n - n_pos) / n_pos))
    out: list[Mapping[str, Any]] = []
    for case, is_pos in zip(cases, pos):
        out.extend([case] * (repeats if is_pos else 1))
    return out


# ---------------------------------------------------------------------------------------------- full-slice lobes


def segment_volume_slices(
    volume: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi_size: int = DEFAULT_PATCH_SIZE,
    sw_batch_size: int = 16,
    overlap: float = 0.25,
    mode: str = "gaussian",
    slice_batch_size: int = 32,
    pad_value: float = 0.0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Lobe labels of every axial slice by sliding-window inference, stitched into a label volume on the input grid.

    Axial slices are taken in batches of ``slice_batch_size``; MONAI's ``SlidingWindowInferer`` tiles each slice
    with ``roi_size`` x ``roi_size`` windows (padding slices smaller than the window with ``pad_value``), runs
    ``predictor`` on ``sw_batch_size`` windows at a time, blends the overlapping outputs and the argmax over
    classes gives the label. Runs under ``torch.no_grad``.

    Args:
        volume: windowed image (1, X, Y, Z) (axis Z axial), as the patches the predictor was trained on.
        predictor: maps windows (P, 1, roi, roi) to class scores (P, C, roi, roi), logits or probabilities
            (e.g. ``M2UNet.segment``).
        roi_size: window size in pixels (the training patch size).
        sw_batch_size: windows per predictor call.
        overlap: window overlap in [0, 1).
        mode: blending of overlapping windows, ``"constant"`` or ``"gaussian"``.
        slice_batch_size: axial slices per inferer call (bounds the memory of the blended scores).
        pad_value: fill value for slices smaller than the window (0 = air after the HU window).
        device: where the predictor runs and the scores are blended (default: the volume's device).

    Returns:
        uint8 tensor (X, Y, Z) of labels in [0, C), on the CPU, on the grid of ``volume`` (its affine applies).
    """
    if volume.dim() != 4 or volume.shape[0] != 1:
        raise ValueError(f"expected a volume of shape (1, X, Y, Z), got {list(volume.shape)}.")
    for name, value in (("roi_size", roi_size), ("sw_batch_size", sw_batch_size),
                        ("slice_batch_size", slice_batch_size)):
        check_positive_int(name, value)
    check_in_range("overlap", overlap, 0.0, 1.0, high_open=True)
    if mode not in ("constant", "gaussian"):
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}.")
    data = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    device = torch.device(device) if device is not None else data.device
    inferer = SlidingWindowInferer(
        roi_size=(int(roi_size), int(roi_size)),
        sw_batch_size=int(sw_batch_size),
        overlap=float(overlap),
        mode=mode,
        padding_mode="constant",
        cval=float(pad_value),
        sw_device=device,
        device=device,
        progress=False,
    )
    _, sx, sy, sz = data.shape
    labels = torch.zeros((sx, sy, sz), dtype=torch.uint8)
    with torch.no_grad():
        for z0 in range(0, sz, int(slice_batch_size)):
            z1 = min(sz, z0 + int(slice_batch_size))
            slices = data[0, :, :, z0:z1].permute(2, 0, 1)[:, None].float()  # (b, 1, X, Y)
            scores = inferer(slices, predictor)
            if isinstance(scores, (tuple, list, dict)):
                raise TypeError(f"predictor must return one tensor (P, C, h, w), got {type(scores).__name__}.")
            labels[:, :, z0:z1] = scores.argmax(dim=1).to(torch.uint8).permute(1, 2, 0).cpu()
    return labels


def lobe_volumes_ml(
    labels: torch.Tensor | np.ndarray, spacing: Sequence[float] | None = None, names: Mapping[int, str] = LOBE_NAMES
) -> dict[str, float]:
    """Volume of each lobe in millilitres.

    Args:
        labels: lobe labels (X, Y, Z) or (1, X, Y, Z).
        spacing: voxel size in mm (3 values); default: from the MetaTensor's affine, else an error.
        names: label value -> name (the project's five lobes by default).

    Returns:
        ``{name: volume in mL}`` for every name (0.0 for an absent lobe).
    """
    if spacing is None:
        if not isinstance(labels, MetaTensor):
            raise ValueError("spacing is required when labels is not a MetaTensor with an affine.")
        spacing = np.linalg.norm(np.asarray(labels.affine)[:3, :3], axis=0).tolist()
    spacing_a = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing_a.size != 3 or not np.all(np.isfinite(spacing_a)) or np.any(spacing_a <= 0):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing!r}.")
    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected labels of shape (X, Y, Z) or (1, X, Y, Z), got {list(array.shape)}.")
    counts = np.bincount(array.reshape(-1).astype(np.int64).clip(min=0), minlength=max(names, default=0) + 1)
    voxel_ml = float(math.prod(spacing_a.tolist())) / 1000.0
    return {name: float(counts[value]) * voxel_ml for value, name in names.items()}
