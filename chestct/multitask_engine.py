"""Multi-task steps and handlers for MONAI/Ignite engines: M2UNet severity classification and lobe segmentation.

The network contract is that of :class:`custom_nets.m2unet.M2UNet`: ``forward(bags, mask, with_segmentation,
seg_index) -> (class_logits (B, K) | None, seg_logits (B, N, C, P, P) | None)``, ``classify(bags, mask, chunk_size)``,
``segment(patches)``, ``regularization_loss()`` and the flags ``has_classification`` / ``has_segmentation``; the loss
is :class:`custom_nets.losses.multitask.M2UNetLoss` (``terms(...)``). Nothing else of either is used here.

- Training (:class:`M2UNetTrainStep`): batches of random patch bags from :class:`chestct.patch_bags.RandomPatchBagd`
  collated by MONAI (``image`` (B, N, 1, P, P), ``lobes`` (B, N, P, P) filled with ``-1`` for scans without lobes,
  ``has_lobes`` (B,), ``label`` (B,)). The segmentation term is computed on the bags that have lobes only (the
  loss's job), and the decoder is skipped altogether for a batch where no bag has any.
- Evaluation and inference (:class:`M2UNetEvalStep`): one *whole preprocessed scan* per iteration (DataLoader with
  ``collate_fn=chestct.multitask_engine.first_item``): ``image`` (1, X, Y, Z) windowed and body-cropped, ``body``,
  optional ``lobes``; the step draws ``num_draws`` random bags with the configured bag builder (seeded per scan, so
  results are reproducible), averages the severity probabilities over the draws, and optionally segments every axial
  slice with a sliding window (:func:`chestct.patch_bags.segment_volume_slices`). By default it runs an
  inference copy of the network (:func:`custom_nets.inference.inference_copy`: batch norms folded, channels-last).
- Handlers: :class:`SeverityReport` (evaluation: ``metrics.json`` flat name -> float, ``per_case.csv``, ``roc.png``)
  and :class:`SeverityWriter` (inference: per scan ``prediction.json``, ``lobes.nii.gz`` on the input grid, lobe
  volumes in mL, ``overlay.png``; cohort ``predictions.csv`` listing failed scans with the reason).
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

from chestct.constants import LOBE_NAMES, NUM_LOBE_CLASSES, SEVERITY_LABELS
from chestct.engines import ResumeFromCheckpoint, latest_checkpoint, require_checkpoint
from chestct.errors import ChestCTInputError
from chestct.patch_bags import lobe_volumes_ml, segment_volume_slices
from chestct.severity_metrics import binary_metrics, lobe_overlap, mean_lobe_metrics
from chestct.writers import (
    PER_CASE_FIELDS,
    CohortWriter,
    EvaluationReport,
    save_nifti_like_input,
    save_roc_png,
    uncrop,
    write_csv,
    write_json,
)
from custom_nets.checks import check_in_range, check_positive_int
from custom_nets.inference import inference_copy

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "M2UNetEvalStep",
    "M2UNetTrainStep",
    "ResumeTraining",
    "SeverityReport",
    "SeverityWriter",
    "first_item",
    "latest_checkpoint",
    "load_cases",
    "loss_terms",
    "lung_box",
    "lung_candidates",
    "segment_lobes",
    "patch_dice_onehot",
    "require_weights",
    "severity_pred_onehot",
    "unwrap",
]

logger = logging.getLogger(__name__)

LOSS_TERM_KEYS = ("loss", "classification", "segmentation", "seg_ce", "seg_dice", "regularization")
SPLITS = ("training", "validation", "test", "all")
INTENDED_USE = "research only, not for clinical use"
# Okabe-Ito colours of lobes 1..5 (RUL, RML, RLL, LUL, LLL) in overlays.
LOBE_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#CC79A7")


# ------------------------------------------------------------------------------------------------------- data lists
def load_cases(
    datalist: str | os.PathLike,
    split: str = "training",
    fold: int | None = None,
    num_folds: int | None = None,
    path_keys: Sequence[str] = ("image", "lobes"),
) -> list[dict[str, Any]]:
    """Cases of a decathlon-style datalist for one split, with absolute paths (the image and the lobe map).

    With a ``fold`` key per case (as :func:`chestct.phantoms.generate_cohort` writes) and ``fold`` given: ``test``
    is fold ``fold``, ``validation`` is fold ``(fold + 1) % num_folds`` and ``training`` is every other fold (the
    k-fold runner overrides ``fold``). Otherwise the datalist's ``training`` / ``validation`` / ``test`` lists are
    used. ``"all"`` gives every case of ``training`` (plus ``validation`` and ``test`` when present).

    Args:
        datalist: path of the JSON datalist; relative paths in it are relative to its folder.
        split: ``"training"``, ``"validation"``, ``"test"`` or ``"all"``.
        fold: the test fold, or ``None`` to use the sections.
        num_folds: number of folds (default: the datalist's ``num_folds``, else the largest fold + 1).
        path_keys: keys holding paths to resolve.

    Returns:
        ``[{"image", "label"?, "lobes"?, "case_id", "fold"?}, ...]``.

    Raises:
        ChestCTInputError: missing datalist, unknown split or an empty selection.
    """
    path = Path(datalist)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not path.is_file():
        raise ChestCTInputError(path, "datalist not found (set --dataset_dir or --datalist)")
    content = json.loads(path.read_text())
    entries: list[Mapping[str, Any]]
    training = list(content.get("training", []))
    has_folds = bool(training) and all("fold" in e for e in training)
    if split == "all":
        entries = training + list(content.get("validation", [])) + list(content.get("test", []))
    elif fold is not None and has_folds:
        k = int(num_folds or content.get("num_folds") or (max(int(e["fold"]) for e in training) + 1))
        if not 0 <= int(fold) < k:
            raise ValueError(f"fold must be in [0, {k}), got {fold!r}.")
        val_fold = (int(fold) + 1) % k
        if split == "test":
            entries = [e for e in training if int(e["fold"]) == int(fold)]
        elif split == "validation":
            entries = [e for e in training if int(e["fold"]) == val_fold]
        else:
            entries = [e for e in training if int(e["fold"]) not in (int(fold), val_fold)]
    else:
        entries = list(content.get(split, []))
    cases = []
    for entry in entries:
        case: dict[str, Any] = {}
        for key in path_keys:
            if entry.get(key):
                p = Path(entry[key])
                case[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        if "image" not in case:
            raise ChestCTInputError(path, f"a case has no image: {dict(entry)}")
        if "label" in entry:
            case["label"] = int(entry["label"])
        if "fold" in entry:
            case["fold"] = int(entry["fold"])
        case["case_id"] = str(entry.get("case_id") or _scan_id(case["image"]))
        cases.append(case)
    if not cases:
        raise ChestCTInputError(path, f"no case in split {split!r} (fold {fold}).")
    return cases


def _scan_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def first_item(batch: Sequence[Any]) -> Any:
    """``collate_fn`` for one scan per iteration: the scan's dictionary itself (MetaTensors and meta kept)."""
    if len(batch) != 1:
        raise ValueError(f"evaluation and inference take one scan per batch (batch_size: 1), got {len(batch)}.")
    return batch[0]


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def parameter_groups(
    network: nn.Module, lr: float, head_lr_factor: float = 1.0, concept_lr_factor: float = 1.0
) -> list[dict]:
    """:meth:`custom_nets.M2UNet.parameter_groups` of a network that may be wrapped (DistributedDataParallel)."""
    return unwrap(network).parameter_groups(lr, head_lr_factor, concept_lr_factor)


def _autocast(engine: Any, device: torch.device):
    use_amp = bool(getattr(engine, "amp", False)) and device.type == "cuda"
    return torch.autocast("cuda", enabled=True) if use_amp else torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------------------ steps
class M2UNetTrainStep:
    """The training iteration for ``SupervisedTrainer(iteration_update=M2UNetTrainStep())``.

    One forward pass of both branches, then ``engine.loss_function.terms(class_logits, labels, seg_logits, lobes,
    has_lobes, regularization=network.regularization_loss())``. When no bag of the batch has lobe labels, the
    decoder is not run (``skip_decoder_without_lobes``): the segmentation term is 0 either way, and this saves about
    two thirds of the step (with DistributedDataParallel, build it with ``find_unused_parameters=True``).

    Returns (``engine.state.output``): the loss terms (detached scalars), ``pred`` (class logits, (B, K), absent for a
    segmentation-only network) and ``label`` (B,).

    Args:
        skip_decoder_without_lobes: skip the decoder for batches without any lobe labels.
        seg_patches_per_bag: when set, only this many patches of each bag, picked at random every step, go through
            the decoder and the segmentation loss (the classifier still sees the whole bag); ``None`` (the paper)
            segments every patch. The decoder costs about twice the encoder, so a subset makes a step of joint
            training cheaper in time and memory (measured on the CPU: 0.55x the time with 2 of 8 patches of the
            paper's size, 7.5 instead of 13.4 GB saved for backward for 50 of 200; 0.70x the time with 3 of 6 in
            the learning check), at the price of fewer segmentation samples per step.

    Raises:
        ValueError: when ``seg_patches_per_bag`` is not a positive integer or ``None``.
    """

    def __init__(self, skip_decoder_without_lobes: bool = True, seg_patches_per_bag: int | None = None) -> None:
        if seg_patches_per_bag is not None and (
            not isinstance(seg_patches_per_bag, int) or isinstance(seg_patches_per_bag, bool) or seg_patches_per_bag < 1
        ):
            raise ValueError(f"seg_patches_per_bag must be a positive integer or None, got {seg_patches_per_bag!r}.")
        self.skip_decoder_without_lobes = bool(skip_decoder_without_lobes)
        self.seg_patches_per_bag = seg_patches_per_bag

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device = torch.device(getattr(engine.state, "device", None) or "cpu")
        non_blocking = bool(getattr(engine, "non_blocking", False))
        images = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking)
        if images.dim() != 5:
            raise ValueError(f"expected bags of shape (B, N, 1, P, P), got {list(images.shape)}.")
        labels = torch.as_tensor(batchdata["label"]).reshape(-1).long().to(device)
        lobes = batchdata.get("lobes")
        has_lobes = batchdata.get("has_lobes")
        if lobes is not None:
            lobes = torch.as_tensor(lobes).to(device=device, non_blocking=non_blocking)
        if has_lobes is not None:
            has_lobes = torch.as_tensor(has_lobes).reshape(-1).to(device=device, dtype=torch.bool)
        any_lobes = lobes is not None and (has_lobes is None or bool(has_lobes.any()))
        net = unwrap(engine.network)
        run_decoder = bool(net.has_segmentation) and (any_lobes or not self.skip_decoder_without_lobes)

        seg_index = None
        num_patches = images.shape[1]
        if run_decoder and self.seg_patches_per_bag is not None and self.seg_patches_per_bag < num_patches:
            seg_index = torch.randperm(num_patches)[: self.seg_patches_per_bag].sort().values.to(device)
            if lobes is not None:
                lobes = lobes[:, seg_index]

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", True))
        with _autocast(engine, device):
            class_logits, seg_logits = engine.network(images, None, run_decoder, seg_index)
            terms = dict(
                engine.loss_function.terms(
                    class_logits,
                    labels if class_logits is not None else None,
                    seg_logits,
                    lobes if any_lobes else None,
                    has_lobes=has_lobes,
                    regularization=net.regularization_loss(),
                )
            )
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at iteration {engine.state.iteration}.")
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False) and device.type == "cuda":
            scaler.scale(loss).backward()
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        output: dict[str, Any] = {k: v.detach() for k, v in terms.items()}
        if class_logits is not None:
            output["pred"] = class_logits.detach()
        output["label"] = labels
        return output


class M2UNetEvalStep:
    """The evaluation/inference iteration for ``SupervisedEvaluator(iteration_update=M2UNetEvalStep(bagger))``.

    Takes one preprocessed scan (``image`` (1, X, Y, Z), ``body``, optional ``lobes``, ``label``, ``case_id``; see
    :func:`first_item`). A scan whose preprocessing failed (``image`` is ``None`` and ``error`` says why, from
    :class:`chestct.bags.SafeTransform`) is passed through with its reason.

    Severity: ``num_draws`` bags are drawn by ``bagger`` (a :class:`chestct.patch_bags.RandomPatchBagd`, seeded from
    ``seed`` and the case id, so a scan always gets the same bags), classified without the decoder, and their
    probabilities averaged (the paper tests on one random bag; report the number of draws).

    Lobes: with ``segment_volume`` every axial slice is segmented by a sliding window of ``roi_size`` (the training
    patch size) and the labels outside the body mask are set to background; with ``patch_dice`` the patches of the
    first draw are segmented and returned with their true lobes, for a cheap validation Dice.

    Returns (``engine.state.output``): ``{"pred": (1, K) mean probabilities or None, "label": (1,) or None,
    "draw_probabilities": list, "lobes_pred": uint8 (X, Y, Z) or absent, "lobes_true": int64 (X, Y, Z) or absent,
    "patch_seg_pred"/"patch_seg_label": (N, P, P), "case_id", "source", "geometry", "spacing", "image" (X, Y, Z)
    with keep_image, "error"}``, all on the CPU.

    Args:
        bagger: callable turning ``{"image", "body", "lobes"?}`` into a bag dict with ``image`` (N, 1, P, P) (and
            ``lobes`` (N, P, P) when it cuts them); required for classification and ``patch_dice``.
        num_draws: bags per scan whose probabilities are averaged.
        segment_volume: segment every axial slice (full-slice lobe labels).
        patch_dice: segment the patches of the first draw (validation).
        roi_size: sliding-window size in pixels.
        sw_batch_size: windows per network call.
        overlap: sliding-window overlap in [0, 1).
        slice_batch_size: axial slices per sliding-window call.
        chunk_size: patches per encoder call in classification (bounds the memory; 0: all at once).
        seed: base seed of the bag draws.
        keep_image: return the windowed volume (for overlays).
        crop_to_lungs: segment only the box of the aerated lungs (:func:`lung_box`: body voxels darker than
            ``lung_threshold`` on the windowed image, union over slices, plus ``lung_margin`` pixels, and the slices
            holding them); everything outside is background. Inference cost falls with the box's area.
        whole_slice: one window per slice covering the whole (cropped) slice, padded to a multiple of 16, instead of
            ``roi_size`` windows (the network is fully convolutional); bounded by ``max_roi_size`` pixels per side.
        lung_threshold: windowed intensity below which a body voxel counts as air / lung (0.6 = -480 HU with the
            default [-1200, 0] HU window).
        lung_margin: margin of the lung box in pixels.
        max_roi_size: largest whole-slice window side (bounds the memory).
        fast_inference: classify and segment with :func:`custom_nets.inference.inference_copy` of the network
            (batch norms folded into the convolutions, channels-last memory format: faster, results equal up to
            float rounding; not for TorchScript networks). The copy is kept between scans and rebuilt at the start
            of every evaluator run and whenever a parameter or buffer of the network has changed (validation during
            training), so it never lags behind the weights; it holds a second copy of the weights on ``device``.
            False runs the network itself.
    """

    PASS_THROUGH = ("case_id", "error")

    def __init__(
        self,
        bagger: Callable[[Mapping[str, Any]], Any] | None = None,
        num_draws: int = 1,
        segment_volume: bool = False,
        patch_dice: bool = False,
        roi_size: int = 128,
        sw_batch_size: int = 16,
        overlap: float = 0.25,
        slice_batch_size: int = 16,
        chunk_size: int = 50,
        seed: int = 0,
        keep_image: bool = False,
        crop_to_lungs: bool = False,
        whole_slice: bool = False,
        lung_threshold: float = 0.6,
        lung_margin: int = 8,
        max_roi_size: int = 512,
        fast_inference: bool = True,
    ) -> None:
        for name, value in (("num_draws", num_draws), ("roi_size", roi_size), ("sw_batch_size", sw_batch_size),
                            ("slice_batch_size", slice_batch_size)):
            check_positive_int(name, value)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an integer >= 0, got {chunk_size!r}.")
        check_in_range("overlap", overlap, 0.0, 1.0, high_open=True)
        self.bagger, self.num_draws = bagger, num_draws
        self.segment_volume, self.patch_dice = bool(segment_volume), bool(patch_dice)
        self.roi_size, self.sw_batch_size, self.overlap = roi_size, sw_batch_size, float(overlap)
        self.slice_batch_size, self.chunk_size, self.seed = slice_batch_size, chunk_size, int(seed)
        self.keep_image = bool(keep_image)
        self.crop_to_lungs, self.whole_slice = bool(crop_to_lungs), bool(whole_slice)
        self.lung_threshold, self.lung_margin = float(lung_threshold), int(lung_margin)
        self.max_roi_size = int(max_roi_size)
        self.fast_inference = bool(fast_inference)
        self._fast_network: nn.Module | None = None
        self._fast_key: tuple | None = None
        self._last_call: tuple[int, int] | None = None  # (id(engine), engine.state.iteration) of the previous call

    def inference_network(self, engine: Engine) -> nn.Module:
        """The module that classifies and segments: ``unwrap(engine.network)``, or with ``fast_inference`` its
        cached :func:`custom_nets.inference.inference_copy`, rebuilt at the first iteration of every run of
        ``engine`` and whenever the network's weights, buffers, device or dtype have changed."""
        net = unwrap(engine.network)
        if not self.fast_inference:
            return net
        if isinstance(net, torch.jit.ScriptModule):
            raise TypeError(
                f"fast_inference rewrites the Python network, got a TorchScript {type(net).__name__}: build the step "
                "with fast_inference=False."
            )
        iteration = int(getattr(engine.state, "iteration", 0) or 0)
        # the iteration count restarts with every run (MONAI's Evaluator.run sets it to 0): a count that did not grow
        # means a new run, after which the weights may have changed (validation during training)
        new_run = self._last_call is None or self._last_call[0] != id(engine) or iteration <= self._last_call[1]
        self._last_call = (id(engine), iteration)
        key = _weights_key(net)
        if new_run or key is None or key != self._fast_key or self._fast_network is None:
            self._fast_network, self._fast_key = None, None  # free the old copy before building the new one
            self._fast_network, self._fast_key = inference_copy(net), key
        return self._fast_network

    def _draw_bags(self, data: Mapping[str, Any], case_id: str) -> list[dict[str, Any]]:
        if self.bagger is None:
            raise ValueError("M2UNetEvalStep needs a bagger (e.g. chestct.patch_bags.RandomPatchBagd) to classify.")
        set_state = getattr(self.bagger, "set_random_state", None)
        if callable(set_state):
            set_state(seed=(self.seed + zlib.crc32(case_id.encode())) % (2**32))
        source = {k: data[k] for k in ("image", "body", "lobes") if data.get(k) is not None}
        bags = []
        for _ in range(self.num_draws):
            out = self.bagger(source)
            bags.extend(out if isinstance(out, list) else [out])
        return bags

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        output: dict[str, Any] = {k: batchdata.get(k) for k in self.PASS_THROUGH}
        label = batchdata.get("label")
        output["label"] = None if label is None else torch.as_tensor(label).reshape(-1).long()
        output["pred"] = None
        image = batchdata.get("image")
        case_id = str(batchdata.get("case_id") or _scan_id(str(_meta(image).get("filename_or_obj", "scan"))))
        output["case_id"] = case_id
        output["source"] = str(_meta(image).get("filename_or_obj", batchdata.get("image", "")))
        if not isinstance(image, torch.Tensor):
            output["error"] = batchdata.get("error") or "the scan could not be read"
            return output
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"expected one scan (1, X, Y, Z) per iteration, got {list(image.shape)}.")
        device = torch.device(getattr(engine.state, "device", None) or "cpu")
        engine.network.eval()
        net = self.inference_network(engine)
        output["geometry"] = case_geometry(image)
        output["spacing"] = tuple(float(s) for s in np.linalg.norm(np.asarray(_affine(image))[:3, :3], axis=0))
        body = batchdata.get("body")
        with torch.no_grad(), _autocast(engine, device):
            bags: list[dict[str, Any]] = []
            if net.has_classification or (self.patch_dice and net.has_segmentation):
                bags = self._draw_bags(batchdata, case_id)
            if net.has_classification:
                x = torch.stack([torch.as_tensor(b["image"]) for b in bags]).to(device)  # (D, N, 1, P, P)
                probs = torch.softmax(net.classify(x, None, self.chunk_size).float(), dim=-1).cpu()
                output["draw_probabilities"] = probs[:, -1].tolist()
                output["pred"] = probs.mean(dim=0, keepdim=True)
            if self.patch_dice and net.has_segmentation and bags and bags[0].get("lobes") is not None:
                patches = torch.as_tensor(bags[0]["image"]).to(device)
                step = self.chunk_size or patches.shape[0]
                seg = torch.cat([_segment(net, patches[i : i + step], self.fast_inference).argmax(dim=1).cpu()
                                 for i in range(0, patches.shape[0], step)])
                output["patch_seg_pred"] = seg
                output["patch_seg_label"] = torch.as_tensor(bags[0]["lobes"]).long().cpu()
            if self.segment_volume and net.has_segmentation:
                volume = image.as_tensor() if isinstance(image, MetaTensor) else image
                labels = segment_lobes(
                    volume.float(), lambda x: _segment(net, x, self.fast_inference), body=body, roi_size=self.roi_size,
                    sw_batch_size=self.sw_batch_size, overlap=self.overlap, slice_batch_size=self.slice_batch_size,
                    device=device, crop_to_lungs=self.crop_to_lungs, whole_slice=self.whole_slice,
                    lung_threshold=self.lung_threshold, lung_margin=self.lung_margin, max_roi_size=self.max_roi_size,
                )
                if body is not None:
                    labels = labels * (torch.as_tensor(np.asarray(body)).reshape(labels.shape) > 0).to(labels.dtype)
                output["lobes_pred"] = labels
                lobes = batchdata.get("lobes")
                if lobes is not None:
                    output["lobes_true"] = torch.as_tensor(np.asarray(lobes)).reshape(labels.shape).round().long()
        if self.keep_image:
            output["image"] = torch.as_tensor(np.asarray(image[0]), dtype=torch.float32)
        return output


def _segment(net: nn.Module, patches: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``net.segment`` on (P, C, H, W) patches, given in channels-last memory format to a channels-last network
    (:func:`custom_nets.inference.inference_copy`), which spares oneDNN / cuDNN one reorder where C > 1 (for one
    channel both formats are the same)."""
    if channels_last:
        patches = patches.contiguous(memory_format=torch.channels_last)
    return net.segment(patches)


def _weights_key(net: nn.Module) -> tuple | None:
    """What identifies the current weights of ``net``: per parameter and buffer its storage, version counter (every
    in-place change, e.g. an optimizer step or ``load_state_dict``, increments it), device, dtype and shape.
    ``None`` when a tensor has no version counter (created under ``torch.inference_mode``): unknown."""
    try:
        return (id(net),) + tuple(
            (t.data_ptr(), t._version, str(t.device), t.dtype, tuple(t.shape))
            for t in (*net.parameters(), *net.buffers())
        )
    except RuntimeError:
        return None


def lung_candidates(
    image: torch.Tensor | np.ndarray,
    body: torch.Tensor | np.ndarray | None,
    threshold: float = 0.6,
    min_component_fraction: float = 0.05,
) -> np.ndarray | None:
    """Rough aerated-lung mask (X, Y, Z) of a windowed volume (1, X, Y, Z) or (X, Y, Z); ``None`` without a body.

    Body voxels (the body mask filled slice by slice) darker than ``threshold`` (0.6 = -480 HU with the default
    [-1200, 0] HU window), keeping the 3D connected components of at least ``min_component_fraction`` of the largest
    one (the lungs and the airways; bowel gas and noise are dropped). Used only to bound where lobes are segmented.
    """
    if body is None:
        return None
    from scipy import ndimage

    array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    array = array.reshape(array.shape[-3:])
    mask = np.asarray(body.cpu() if isinstance(body, torch.Tensor) else body).reshape(array.shape) > 0
    filled = np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)
    candidates = filled & (array < threshold)
    components, count = ndimage.label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(components.reshape(-1))[1:]
    keep = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
    return np.isin(components, keep)


def lung_box(
    image: torch.Tensor | np.ndarray,
    body: torch.Tensor | np.ndarray | None = None,
    threshold: float = 0.6,
    margin: int = 8,
) -> tuple[slice, slice, slice]:
    """Box (x, y, z slices) of :func:`lung_candidates`, widened by ``margin`` pixels in-plane and 2 slices in z (the
    whole volume without a body mask or without candidates). Dense lesions lie within the box of the surrounding
    aerated lung."""
    shape = tuple(int(s) for s in np.asarray(image.shape)[-3:])
    full = tuple(slice(0, s) for s in shape)
    lungs = lung_candidates(image, body, threshold)
    if lungs is None or not lungs.any():
        return full  # type: ignore[return-value]
    lo, hi = np.argwhere(lungs).min(axis=0), np.argwhere(lungs).max(axis=0) + 1
    pads = (margin, margin, 2)
    box = tuple(slice(max(0, int(a) - m), min(s, int(b) + m)) for a, b, m, s in zip(lo, hi, pads, shape))
    return box  # type: ignore[return-value]


def _ceil_to(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def segment_lobes(
    volume: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    body: Any = None,
    roi_size: int = 128,
    sw_batch_size: int = 16,
    overlap: float = 0.25,
    slice_batch_size: int = 16,
    device: Any = None,
    crop_to_lungs: bool = False,
    whole_slice: bool = False,
    lung_threshold: float = 0.6,
    lung_margin: int = 8,
    max_roi_size: int = 512,
    size_divisor: int = 16,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Full-volume lobe labels (X, Y, Z) uint8; outside the segmented region the labels are background.

    - default: every axial slice by :func:`chestct.patch_bags.segment_volume_slices` (sliding window of
      ``roi_size``);
    - ``crop_to_lungs``: only the box of :func:`lung_candidates` (plus ``lung_margin`` pixels); with ``whole_slice``
      the box is taken per slice (the lungs of slices z - 2 .. z + 2), so that apical and basal slices cost less;
    - ``whole_slice``: one window per slice covering the (cropped) slice, padded with ``pad_value`` to multiples of
      ``size_divisor`` (the network is fully convolutional), sides at most ``max_roi_size`` (larger slices fall back
      to the sliding window); one slice per ``predictor`` call (the boxes differ per slice).
    """
    data = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    data = data.float()
    shape = tuple(int(s) for s in data.shape[1:])
    labels = torch.zeros(shape, dtype=torch.uint8)
    lungs = lung_candidates(data, body, lung_threshold) if crop_to_lungs else None
    if lungs is not None and not lungs.any():
        lungs = None
    if not whole_slice:
        box = lung_box(data, body, lung_threshold, lung_margin) if lungs is not None else tuple(
            slice(0, s) for s in shape)
        sub = data[(slice(None),) + tuple(box)].contiguous()
        labels[tuple(box)] = segment_volume_slices(sub, predictor, roi_size=roi_size, sw_batch_size=sw_batch_size,
                                                   overlap=overlap, slice_batch_size=slice_batch_size, device=device)
        return labels
    # whole-slice windows: one (cropped, padded) slice per window
    device = torch.device(device) if device is not None else data.device
    boxes: list[tuple[int, int, int, int, int]] = []  # z, x0, x1, y0, y1
    sx, sy, sz = shape
    for z in range(sz):
        if lungs is None:
            boxes.append((z, 0, sx, 0, sy))
            continue
        near = lungs[:, :, max(0, z - 2) : z + 3]
        if not near.any():
            continue
        xs, ys = np.flatnonzero(near.any(axis=(1, 2))), np.flatnonzero(near.any(axis=(0, 2)))
        boxes.append((z, max(0, int(xs[0]) - lung_margin), min(sx, int(xs[-1]) + 1 + lung_margin),
                      max(0, int(ys[0]) - lung_margin), min(sy, int(ys[-1]) + 1 + lung_margin)))
    with torch.no_grad():
        for z, x0, x1, y0, y1 in boxes:
            h, w = x1 - x0, y1 - y0
            ph, pw = max(_ceil_to(h, size_divisor), roi_size), max(_ceil_to(w, size_divisor), roi_size)
            window = data[0, x0:x1, y0:y1, z]
            if max(ph, pw) > max_roi_size:
                sub = window[None, :, :, None].contiguous()
                labels[x0:x1, y0:y1, z] = segment_volume_slices(
                    sub, predictor, roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                    slice_batch_size=1, device=device)[:, :, 0]
                continue
            a, b = (ph - h) // 2, (pw - w) // 2
            padded = torch.nn.functional.pad(window, (b, pw - w - b, a, ph - h - a), value=pad_value)
            scores = predictor(padded[None, None].to(device))
            labels[x0:x1, y0:y1, z] = scores[0, :, a : a + h, b : b + w].argmax(dim=0).to(torch.uint8).cpu()
    return labels


def _meta(image: Any) -> Mapping[str, Any]:
    return image.meta if isinstance(image, MetaTensor) else {}


def _affine(image: Any) -> np.ndarray:
    return np.asarray(image.affine, dtype=float) if isinstance(image, MetaTensor) else np.eye(4)


def case_geometry(image: torch.Tensor) -> dict[str, Any]:
    """Where a body-cropped ``(1, X, Y, Z)`` MetaTensor lies in the loaded scan, to write outputs on its grid.

    Returns:
        ``{"crop_start", "crop_shape", "input_shape", "input_affine", "original_affine"}``: the crop's first voxel
        and shape in the loaded (canonical) grid, that grid's shape and voxel-to-RAS affine, and the input file's
        affine (for :func:`chestct.writers.save_nifti_like_input`).
    """
    meta = _meta(image)
    crop_affine = _affine(image)
    crop_shape = [int(s) for s in image.shape[1:]]
    box = meta.get("body_box")
    start = np.zeros(3, dtype=int) if box is None else np.asarray(box[0], dtype=int).reshape(3)
    shift = np.eye(4)
    shift[:3, 3] = -start
    input_affine = crop_affine @ shift
    spatial = meta.get("spatial_shape")
    input_shape = crop_shape if spatial is None else [int(s) for s in np.asarray(spatial).reshape(-1)[:3]]
    original = np.asarray(meta.get("original_affine", input_affine), dtype=float)
    return {
        "crop_start": start.tolist(),
        "crop_shape": crop_shape,
        "input_shape": input_shape,
        "input_affine": input_affine,
        "original_affine": original,
    }


# ------------------------------------------------------------------------------------------------ output transforms
def loss_terms(output: Any) -> dict[str, float]:
    """Output transform for ``StatsHandler`` / ``TensorBoardStatsHandler``: the loss and its terms as floats."""
    if isinstance(output, Sequence) and not isinstance(output, Mapping):
        output = output[0]
    return {k: float(output[k]) for k in LOSS_TERM_KEYS if k in output and output[k] is not None}


def severity_pred_onehot(output: Mapping[str, Any], num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for ``monai.handlers.ROCAUC``: probabilities (B, K) and one-hot labels (B, K)."""
    pred = output.get("pred")
    if pred is None or output.get("label") is None:
        raise ValueError(
            "no severity prediction with a label to score (a segmentation-only network or a failed scan): "
            f"case {output.get('case_id')}, error {output.get('error')!r}."
        )
    pred = torch.as_tensor(pred).float()
    label = F.one_hot(torch.as_tensor(output["label"]).reshape(-1).long(), max(num_classes, pred.shape[1]))
    return pred, label.float()


def patch_dice_onehot(
    output: Mapping[str, Any], num_classes: int = NUM_LOBE_CLASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for ``monai.handlers.MeanDice`` on the validation patches: one-hot (P, C, H, W) pairs.

    Patches without lobe labels (``-1``) are dropped; a scan without any gives an empty batch (0, C, H, W).
    """
    pred = output.get("patch_seg_pred")
    label = output.get("patch_seg_label")
    if pred is None or label is None:
        return torch.zeros(0, num_classes, 1, 1), torch.zeros(0, num_classes, 1, 1)
    keep = (label >= 0).all(dim=-1).all(dim=-1)
    pred, label = pred[keep], label[keep]
    return (F.one_hot(pred.long(), num_classes).permute(0, 3, 1, 2).float(),
            F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float())


# ------------------------------------------------------------------------------------------------------ handlers
def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


class SeverityReport(EvaluationReport):
    """Evaluation handler: the paper's Table II (severity) and Table III (lobes) over the evaluated scans.

    At the end of the run it writes under ``output_dir``:

    - ``metrics.json``: flat ``{name: float}`` (undefined values such as an AUC over one class are left out):
      ``accuracy``, ``precision``, ``recall``, ``f1``, ``auc``,
      ``specificity``, confusion counts, ``num_cases``, ``num_draws``, and with lobe labels
      ``lobe_<lobe>_{dsc,sensitivity,ppv}`` and ``lobe_mean_{dsc,sensitivity,ppv}`` (means over scans of the
      per-scan values), ``lobe_num_cases``;
    - ``per_case.csv``: case, label, probability (mean of the draws), prediction, the draws, and the scan's lobe DSC;
    - ``roc.png`` (when both classes are present).

    The scalar metrics also go to ``engine.state.metrics`` (prefixed by ``prefix``).

    Args:
        output_dir: folder of the report.
        threshold: decision threshold on the severe probability.
        class_names: names of classes 0 and 1.
        prefix: prefix of the names in ``engine.state.metrics``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float = 0.5,
        class_names: Sequence[str] = tuple(SEVERITY_LABELS.values()),
        prefix: str = "test_",
    ) -> None:
        super().__init__(output_dir, threshold, class_names, prefix)

    def _on_iteration(self, engine: Engine) -> None:
        out = engine.state.output
        row: dict[str, Any] = {"case_id": out.get("case_id"), "source": out.get("source"),
                               "error": out.get("error") or ""}
        label = out.get("label")
        row["label"] = None if label is None else int(torch.as_tensor(label).reshape(-1)[0])
        pred = out.get("pred")
        row["probability"] = None if pred is None else float(torch.as_tensor(pred)[0, -1])
        row["draws"] = out.get("draw_probabilities") or []
        if out.get("lobes_pred") is not None and out.get("lobes_true") is not None:
            row["lobes"] = lobe_overlap(np.asarray(out["lobes_pred"]), np.asarray(out["lobes_true"]))
        self.rows.append(row)

    def _on_run_end(self, engine: Engine) -> None:
        scored = [r for r in self.rows if r["label"] is not None and r["probability"] is not None]
        metrics: dict[str, float] = {}
        if scored:
            probs = [r["probability"] for r in scored]
            labels = [r["label"] for r in scored]
            metrics.update(binary_metrics(probs, labels, self.threshold))
            metrics["num_draws"] = float(max(len(r["draws"]) for r in scored))
            metrics["threshold"] = self.threshold
        lobe_rows = [r["lobes"] for r in self.rows if "lobes" in r]
        metrics.update(mean_lobe_metrics(lobe_rows, prefix="lobe_"))
        metrics["num_failed"] = float(sum(bool(r["error"]) for r in self.rows))
        # flat name -> float; undefined values (NaN, e.g. an AUC with one class) are left out
        write_json({k: v for k, v in metrics.items() if _finite(v)}, self.output_dir / "metrics.json")
        write_csv([self._per_case_row(r) for r in self.rows], SEVERITY_PER_CASE_FIELDS,
                  self.output_dir / "per_case.csv")
        if scored and 0 < sum(labels) < len(labels):
            save_roc_png(probs, labels, self.output_dir / "roc.png",
                         title=f"ROC, {len(labels)} scans (positive: {self.class_names[1]})")
        self.publish(engine, metrics, len(self.rows))

    def _per_case_row(self, r: Mapping[str, Any]) -> dict[str, Any]:
        lobes = r.get("lobes") or {}
        return {
            "case_id": r["case_id"], "source": r["source"], **self.prediction_fields(r["probability"], r["label"]),
            "draw_probabilities": " ".join(f"{p:.4f}" for p in r["draws"]), "error": r["error"],
            "lobe_mean_dsc": _fmt(lobes.get("mean_dsc")),
            **{f"{name}_dsc": _fmt(lobes.get(f"{name}_dsc")) for name in LOBE_NAMES.values()},
        }


# SeverityReport's per_case.csv columns.
SEVERITY_PER_CASE_FIELDS = (
    PER_CASE_FIELDS + ("draw_probabilities", "lobe_mean_dsc") + tuple(f"{n}_dsc" for n in LOBE_NAMES.values())
    + ("error",)
)


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


class SeverityWriter(CohortWriter):
    """Inference handler: per scan the severity, the lobe label volume on the input grid, lobe volumes and a PNG.

    Per scan ``output_dir/<case_id>/``:

    - ``prediction.json``: severe probability (mean over ``num_draws`` random bags) and each draw's, predicted
      label and name, threshold, volume of each lobe in mL, the files written, the intended use;
    - ``lobes.nii.gz``: uint8 lobe labels (0 background, 1..5 as :data:`chestct.constants.LOBE_NAMES`) on the input
      file's voxel grid and affine;
    - ``overlay.png``: axial slices with the lobes in colour over the windowed image.

    ``output_dir/predictions.csv`` lists every scan: ``status`` ok/failed, ``reason``, probability, label, lobe
    volumes.

    Args:
        output_dir: output folder.
        threshold: decision threshold on the severe probability.
        class_names: names of classes 0 and 1.
        num_overlay_slices: slices in the overlay PNG.
        write_volume: write ``lobes.nii.gz``.
    """

    csv_fields = (("case_id", "source", "status", "probability_severe", "label", "label_name")
                  + tuple(f"{n}_ml" for n in LOBE_NAMES.values()) + ("reason",))

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float = 0.5,
        class_names: Sequence[str] = tuple(SEVERITY_LABELS.values()),
        num_overlay_slices: int = 4,
        write_volume: bool = True,
    ) -> None:
        if isinstance(num_overlay_slices, bool) or not isinstance(num_overlay_slices, int) or num_overlay_slices < 1:
            raise ValueError(f"num_overlay_slices must be a positive integer, got {num_overlay_slices!r}.")
        super().__init__(output_dir, threshold, class_names)
        self.num_overlay_slices = num_overlay_slices
        self.write_volume = bool(write_volume)

    def _on_iteration(self, engine: Engine) -> None:
        out = engine.state.output
        case = str(out.get("case_id") or f"scan_{len(self.rows):04d}")
        no_output = out.get("pred") is None and out.get("lobes_pred") is None
        error = out.get("error") or ("no prediction" if no_output else None)
        self._record(case, out.get("source"), error, lambda: self._write_case(out, case))

    def _write_case(self, out: Mapping[str, Any], case: str) -> dict[str, Any]:
        folder = self.output_dir / case
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        report: dict[str, Any] = {"case_id": case, "source": out.get("source")}
        row: dict[str, Any] = {"case_id": case, "source": out.get("source"), "status": "ok", "reason": ""}
        if out.get("pred") is not None:
            prob = float(torch.as_tensor(out["pred"])[0, -1])
            label = int(prob >= self.threshold)
            report.update({"probability_severe": prob, "label": label, "label_name": self.class_names[label],
                           "threshold": self.threshold, "num_draws": len(out.get("draw_probabilities") or []),
                           "draw_probabilities": [round(p, 6) for p in out.get("draw_probabilities") or []]})
            row.update({"probability_severe": f"{prob:.6f}", "label": label, "label_name": self.class_names[label]})
        lobes = out.get("lobes_pred")
        if lobes is not None:
            labels = np.asarray(lobes, dtype=np.uint8)
            volumes = lobe_volumes_ml(labels, spacing=out["spacing"])
            report["lobe_volumes_ml"] = {k: round(v, 2) for k, v in volumes.items()}
            row.update({f"{k}_ml": f"{v:.2f}" for k, v in volumes.items()})
            geometry = out["geometry"]
            if self.write_volume:
                start = np.asarray(geometry["crop_start"], dtype=int)
                full = uncrop(labels, (start, start + np.asarray(labels.shape)), geometry["input_shape"], fill=0)
                save_nifti_like_input(full, geometry["input_affine"], geometry["original_affine"],
                                      folder / "lobes.nii.gz", dtype=np.uint8)
                files["lobes"] = "lobes.nii.gz"
            if out.get("image") is not None:
                self._overlay(np.asarray(out["image"]), labels, folder / "overlay.png", case, report)
                files["overlay"] = "overlay.png"
        report["files"] = files
        report["intended_use"] = INTENDED_USE
        write_json(report, folder / "prediction.json")
        return row

    def _overlay(self, image: np.ndarray, labels: np.ndarray, path: Path, case: str, report: Mapping) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        zs = np.flatnonzero(labels.any(axis=(0, 1)))
        if zs.size == 0:
            zs = np.arange(labels.shape[2])
        picks = np.unique(np.linspace(zs[0], zs[-1], num=min(self.num_overlay_slices + 2, zs.size)).round()
                          .astype(int))
        if picks.size > 2:
            picks = picks[1:-1]  # skip the first and last lobe slices (tiny apex and base)
        cmap = ListedColormap(LOBE_COLOURS)
        figure, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.8), squeeze=False)
        for ax, z in zip(axes[0], picks[::-1]):
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            lab = labels[:, :, z].T.astype(float)
            ax.imshow(np.ma.masked_where(lab == 0, lab), cmap=cmap, vmin=0.5, vmax=5.5, alpha=0.4,
                      interpolation="nearest")
            ax.set_title(f"slice {int(z)}", fontsize=9)
            ax.axis("off")
        title = f"{case}"
        if "probability_severe" in report:
            title += f": P(severe) = {report['probability_severe']:.3f} ({report['label_name']})"
        legend = ", ".join(f"{v} {n}" for v, n in LOBE_NAMES.items())
        figure.suptitle(f"{title} - research only\nlobes: {legend}", fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=80)
        plt.close(figure)


# ----------------------------------------------------------------------------------------------------- checkpoints
class ResumeTraining(ResumeFromCheckpoint):
    """Resume from the latest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` when ``enabled`` and one exists.

    A config cannot name the trainer inside the trainer's own handlers (a circular reference), so the engine this
    handler is attached to is added to ``load_dict`` under ``trainer_key``, in place: give the *same* dictionary to
    MONAI's ``CheckpointSaver`` (listed after this handler) and the periodic checkpoints hold the trainer state too.

    Args:
        ckpt_dir: folder of the periodic checkpoints.
        load_dict: objects to restore (network, optimizer, lr scheduler), as for ``CheckpointLoader``; modified in
            place.
        enabled: whether to resume.
        map_location: device mapping for ``torch.load``.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: dict[str, Any], enabled: bool = True,
                 map_location: Any = "cpu", trainer_key: str = "trainer") -> None:
        if not isinstance(load_dict, dict):
            raise TypeError(f"load_dict must be a dict, got {type(load_dict).__name__}.")
        super().__init__(ckpt_dir, load_dict, bool(enabled), map_location)
        # the caller's dictionary itself, so that the CheckpointSaver given the same one saves the trainer too
        self.load_dict, self.trainer_key = load_dict, trainer_key

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault(self.trainer_key, engine)
        super().attach(engine)


def require_weights(path: str | os.PathLike) -> str:
    """``path`` when it is a file, else a clear error saying how to get weights (see ``require_checkpoint``)."""
    return str(require_checkpoint(path))


