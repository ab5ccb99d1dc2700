"""MIL steps and handlers for MONAI/Ignite engines: bag training with a two-term loss, evaluation with attention,
classification reports and attention writers.

The network contract is a ``forward_features(images, mask) -> dict`` method returning at least ``logits``
``(B, K)``, ``bag_features`` ``(B, D)``, ``instance_features`` ``(B, N, D)``, ``instance_weights`` ``(B, N)`` and
``spatial_attention`` ``(B, N, h, w)`` (as :class:`custom_nets.dacmil.DACMIL` does); nothing else of the network is
used here. The steps call it once per batch.

Batches come from :func:`chestct.bags.collate_bags`: ``image`` ``(B, N, 1, S, S)``, ``mask`` ``(B, N)``, ``label``
``(B,)`` and pass-through keys (``case_id``, ``source``, ``slice_indices``, ``geometry``, ``error``). Engines are
built with ``decollate=False``: outputs stay batch dicts, which the handlers here read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestct.bags import BAG_MASK_KEY, GEOMETRY_KEY, PATCH_BOXES_KEY, SLICE_INDICES_KEY
from chestct.severity_metrics import binary_metrics  # one set of binary metrics for both bundles
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

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "AttentionWriter",
    "ClassificationReport",
    "FeaturesForward",
    "MILEvalStep",
    "MILTrainStep",
    "ResumeFromCheckpoint",
    "bag_pred_onehot",
    "classification_metrics",
    "latest_checkpoint",
    "loss_terms",
    "mil_forward",
    "default_bundle_root",
    "require_checkpoint",
]

logger = logging.getLogger(__name__)
LOSS_TERM_KEYS = ("loss", "ce", "contrastive")
CHECKPOINT_PATTERN = re.compile(r"checkpoint_(?:epoch|iteration)=(\d+)\.pt$")


class FeaturesForward(nn.Module):
    """Wrap a network so that ``forward`` returns its ``forward_features`` dict.

    DistributedDataParallel only synchronises gradients of what goes through its own ``forward``; wrap the network
    with this before DDP (``DDP(FeaturesForward(net))``) so the MIL step still gets every output in one pass. The
    wrapped network's parameters are shared (save checkpoints of the inner network for clean keys).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(network, "forward_features", None)):
            raise TypeError(f"{type(network).__name__} has no forward_features(images, mask) method.")
        self.net = network

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.net.forward_features(images, mask)


def mil_forward(network: nn.Module, images: torch.Tensor, mask: torch.Tensor | None) -> Mapping[str, torch.Tensor]:
    """One pass of ``network`` giving the ``forward_features`` dict, through DDP when the network is wrapped."""
    if isinstance(network, FeaturesForward) or (
        isinstance(network, nn.parallel.DistributedDataParallel) and isinstance(network.module, FeaturesForward)
    ):
        out = network(images, mask)
    elif callable(getattr(network, "forward_features", None)):
        out = network.forward_features(images, mask)
    else:
        raise TypeError(
            f"{type(network).__name__} has no forward_features(images, mask); wrap DDP models as "
            "DistributedDataParallel(chestct.engines.FeaturesForward(net))."
        )
    if not isinstance(out, Mapping) or "logits" not in out:
        raise TypeError("forward_features must return a dict with at least 'logits'.")
    return out


def _to_device(batch: Mapping[str, Any], device: torch.device | str | None, non_blocking: bool = False):
    images = batch["image"]
    if not isinstance(images, torch.Tensor):
        raise TypeError("the batch has no image tensor (was a failed scan put in a training batch?)")
    images = torch.as_tensor(images).to(device=device, non_blocking=non_blocking)
    mask = batch.get(BAG_MASK_KEY)
    if mask is not None:
        mask = torch.as_tensor(mask).to(device=device, dtype=torch.bool)
    return images, mask


def _labels(batch: Mapping[str, Any], device: torch.device | str | None) -> torch.Tensor:
    return torch.as_tensor(batch["label"]).reshape(-1).long().to(device)


def _autocast(engine: Any, device: torch.device | str | None):
    use_amp = bool(getattr(engine, "amp", False)) and torch.device(device or "cpu").type == "cuda"
    return torch.autocast("cuda", enabled=True) if use_amp else torch.autocast("cpu", enabled=False)


class MILTrainStep:
    """The MIL training iteration for ``SupervisedTrainer(iteration_update=MILTrainStep())``.

    One ``forward_features`` pass, then ``engine.loss_function(logits, labels, instance_features, bag_features,
    mask)`` (e.g. :class:`custom_nets.losses.contrastive.DACMILLoss`); when the loss has a ``terms`` method its terms
    (``ce``, ``contrastive``) are returned too, for :func:`loss_terms` and the stats/TensorBoard handlers. A plain
    loss ``loss(logits, labels)`` is used when it does not take the features (``bag_only=True``). Mixed precision
    follows ``engine.amp`` on CUDA (never on the CPU, where bf16 is far slower).

    Returns (``engine.state.output``): ``{"loss", "ce", "contrastive", "pred": logits, "label"}`` (terms as
    detached scalars).

    Args:
        bag_only: call ``loss_function(logits, labels)`` instead of the MIL signature.
    """

    def __init__(self, bag_only: bool = False) -> None:
        self.bag_only = bag_only

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device = getattr(engine.state, "device", None)
        images, mask = _to_device(batchdata, device, getattr(engine, "non_blocking", False))
        labels = _labels(batchdata, images.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", True))
        with _autocast(engine, images.device):
            out = mil_forward(engine.network, images, mask)
            loss_fn = engine.loss_function
            if self.bag_only:
                terms = {"loss": loss_fn(out["logits"], labels)}
            elif callable(getattr(loss_fn, "terms", None)):
                terms = dict(loss_fn.terms(out["logits"], labels, out["instance_features"], out["bag_features"],
                                           out.get("mask", mask)))
            else:
                terms = {"loss": loss_fn(out["logits"], labels, out["instance_features"], out["bag_features"],
                                         out.get("mask", mask))}
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at iteration {engine.state.iteration}.")
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            scaler.scale(loss).backward()
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        output: dict[str, Any] = {k: v.detach() for k, v in terms.items()}
        output["pred"] = out["logits"].detach()
        output["label"] = labels
        return output


class MILEvalStep:
    """The MIL evaluation/inference iteration for ``SupervisedEvaluator(iteration_update=MILEvalStep())``.

    Runs the network once in eval mode without gradients and returns class probabilities with the attention, for
    metrics and writers. A batch whose scan failed to load (``image`` is ``None`` and ``error`` says why, see
    :class:`chestct.bags.SafeTransform`; inference uses batches of one scan) is passed through with its reason.

    Returns (``engine.state.output``): ``{"pred": probabilities (B, K), "label": (B,) or None,
    "instance_weights": (B, N), "spatial_attention": (B, N, h, w), "mask": (B, N), "image": bags when
    keep_images}`` plus the batch's pass-through keys (``case_id``, ``source``, ``slice_indices``, ``geometry``...),
    all on the CPU.

    Args:
        keep_images: return the input bags (for attention overlays).
    """

    PASS_THROUGH = ("case_id", "source", SLICE_INDICES_KEY, PATCH_BOXES_KEY, GEOMETRY_KEY, "error",
                    "lung_area_fraction")

    def __init__(self, keep_images: bool = False) -> None:
        self.keep_images = keep_images

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        output: dict[str, Any] = {k: batchdata[k] for k in self.PASS_THROUGH if k in batchdata}
        label = batchdata.get("label")
        output["label"] = None if label is None else torch.as_tensor(label).reshape(-1).long()
        if not isinstance(batchdata.get("image"), torch.Tensor):
            output["pred"] = None
            return output
        device = getattr(engine.state, "device", None)
        images, mask = _to_device(batchdata, device, getattr(engine, "non_blocking", False))
        engine.network.eval()
        with torch.no_grad(), _autocast(engine, images.device):
            out = mil_forward(engine.network, images, mask)
        output["pred"] = torch.softmax(out["logits"].float(), dim=-1).cpu()
        for key in ("instance_weights", "spatial_attention", "mask"):
            if key in out:
                output[key] = out[key].float().cpu() if key != "mask" else out[key].cpu()
        if self.keep_images:
            output["image"] = images.cpu()
        return output


def loss_terms(output: Any) -> dict[str, float]:
    """Output transform for ``StatsHandler``/``TensorBoardStatsHandler``: the loss and its terms as floats."""
    if isinstance(output, Sequence) and not isinstance(output, Mapping):
        output = output[0]
    return {k: float(output[k]) for k in LOSS_TERM_KEYS if k in output and output[k] is not None}


def bag_pred_onehot(output: Any, num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for ``monai.handlers.ROCAUC``: probabilities ``(B, K)`` and one-hot labels ``(B, K)``."""
    pred = torch.as_tensor(output["pred"]).float()
    label = F.one_hot(torch.as_tensor(output["label"]).reshape(-1).long(), num_classes=max(num_classes, pred.shape[1]))
    return pred, label.float()


def classification_metrics(probabilities: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """The DA-CMIL paper's Table 1 columns for a binary task (positive class 1) and the confusion matrix.

    Args:
        probabilities: predicted probability of class 1 per case.
        labels: true labels (0 or 1).
        threshold: a case is predicted positive when its probability is ``>= threshold``.

    Returns:
        ``accuracy``, ``auc`` (NaN when one class is absent), ``f1``, ``specificity``, ``sensitivity``,
        ``confusion_matrix`` (``[[TN, FP], [FN, TP]]``, rows = truth), ``num_cases`` and ``threshold``.
    """
    m = binary_metrics(probabilities, labels, threshold)
    tn, fp, fn, tp = (int(m[k]) for k in ("tn", "fp", "fn", "tp"))
    return {
        "num_cases": int(m["num_cases"]),
        "accuracy": m["accuracy"],
        "auc": m["auc"],
        "f1": m["f1"],
        "specificity": m["specificity"],
        "sensitivity": m["recall"],
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def _as_list(value: Any, size: int) -> list:
    if value is None:
        return [None] * size
    if isinstance(value, torch.Tensor):
        return list(value) if value.dim() > 0 else [value] * size
    return list(value)


class ClassificationReport(EvaluationReport):
    """Evaluation handler: collects per-case probabilities and writes the classification report.

    At the end of each evaluation run it writes under ``output_dir``: ``metrics.json`` (accuracy, AUC, F1,
    specificity, sensitivity, confusion matrix), ``per_case.csv`` (case, label, probability, prediction),
    ``roc.png`` and ``confusion_matrix.png``; the scalar metrics also go to ``engine.state.metrics`` (prefixed by
    ``prefix``) for the stats handlers.

    Args:
        output_dir: folder of the report.
        threshold: decision threshold on the class-1 probability.
        class_names: names of classes 0 and 1 (for the CSV and plots).
        prefix: prefix of the metric names in ``engine.state.metrics``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float = 0.5,
        class_names: Sequence[str] = ("other_pneumonia", "covid19"),
        prefix: str = "test_",
    ) -> None:
        super().__init__(output_dir, threshold, class_names, prefix)

    def _on_iteration(self, engine: Engine) -> None:
        out = engine.state.output
        if out.get("pred") is None:
            return
        pred = torch.as_tensor(out["pred"])
        size = pred.shape[0]
        for case, source, label, prob in zip(
            _as_list(out.get("case_id"), size), _as_list(out.get("source"), size),
            _as_list(out.get("label"), size), pred[:, -1].tolist(),
        ):
            self.rows.append({"case_id": case, "source": source,
                              "label": None if label is None else int(label), "probability": float(prob)})

    def _on_run_end(self, engine: Engine) -> None:
        rows = [r for r in self.rows if r["label"] is not None]
        if not rows:
            logger.warning("ClassificationReport: no labelled case to evaluate.")
            return
        probs = [r["probability"] for r in rows]
        labels = [r["label"] for r in rows]
        metrics = classification_metrics(probs, labels, self.threshold)
        write_json(metrics, self.output_dir / "metrics.json")
        per_case = [{"case_id": r["case_id"], "source": r["source"],
                     **self.prediction_fields(r["probability"], r["label"])} for r in self.rows]
        write_csv(per_case, PER_CASE_FIELDS, self.output_dir / "per_case.csv")
        if 0 < sum(labels) < len(labels):
            save_roc_png(probs, labels, self.output_dir / "roc.png",
                         title=f"ROC, {len(labels)} cases (positive: {self.class_names[1]})")
        self._confusion_png(metrics["confusion_matrix"])
        self.publish(engine, metrics, len(rows))

    def _confusion_png(self, matrix: Sequence[Sequence[int]]) -> None:
        import matplotlib.pyplot as plt

        figure, ax = plt.subplots(figsize=(4, 3.6))
        ax.imshow(np.asarray(matrix), cmap="Blues")
        for (i, j), value in np.ndenumerate(np.asarray(matrix)):
            ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=12)
        ax.set_xticks([0, 1], self.class_names, fontsize=8)
        ax.set_yticks([0, 1], self.class_names, fontsize=8)
        ax.set_xlabel("prediction")
        ax.set_ylabel("truth")
        figure.tight_layout()
        figure.savefig(self.output_dir / "confusion_matrix.png", dpi=100)
        plt.close(figure)


def _normalise(values: np.ndarray) -> np.ndarray:
    top = float(values.max()) if values.size else 0.0
    return values / top if top > 0 else values


class AttentionWriter(CohortWriter):
    """Inference handler: per scan a JSON report, PNG overlays of the top slices and an attention volume (NIfTI on
    the input scan's grid), and a cohort CSV with every scan, including the ones that failed and why.

    Per scan ``output_dir/<case_id>/``:

    - ``prediction.json``: probability of class 1, predicted label and name, the slices ranked by instance
      attention (``index`` = axial slice index in the input volume's LPS order, ``weight``; the weights of the
      instances of one slice are summed for patch bags), the files written;
    - ``attention_top_slices.png``: the ``top_k`` slices with the most weight, each shown as the network saw it
      (lung crop, window, resize) with its spatial attention map over it;
    - ``attention.nii.gz``: float32, on the input file's grid: for each slice in the bag, its spatial map
      (rescaled to max 1 per slice) times its instance weight relative to the largest one; 0 elsewhere.

    ``output_dir/predictions.csv`` lists all scans (``status`` ok/failed, ``reason``).

    Args:
        output_dir: output folder.
        threshold: decision threshold on the class-1 probability.
        class_names: names of classes 0 and 1.
        top_k: number of slices in the overlay PNG.
        write_volume: write the attention NIfTI.
    """

    csv_fields = ("case_id", "source", "status", "probability", "label", "label_name", "top_slice", "reason")

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float = 0.5,
        class_names: Sequence[str] = ("other_pneumonia", "covid19"),
        top_k: int = 4,
        write_volume: bool = True,
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        super().__init__(output_dir, threshold, class_names)
        self.top_k = top_k
        self.write_volume = write_volume

    def _on_iteration(self, engine: Engine) -> None:
        out = engine.state.output
        cases = out.get("case_id") or [None]
        size = len(cases)
        errors = _as_list(out.get("error"), size)
        sources = _as_list(out.get("source"), size)
        for b in range(size):
            case = cases[b] or f"scan_{len(self.rows):04d}"
            error = errors[b] or (None if out.get("pred") is not None else "no prediction")
            self._record(case, sources[b], error, lambda b=b, case=case: self._write_case(out, b, case, sources[b]))

    def _write_case(self, out: Mapping[str, Any], b: int, case: str, source: Any) -> dict[str, Any]:
        folder = self.output_dir / str(case)
        folder.mkdir(parents=True, exist_ok=True)
        prob = float(out["pred"][b, -1])
        label = int(prob >= self.threshold)
        mask = out["mask"][b].numpy().astype(bool)
        weights = out["instance_weights"][b].numpy()[mask]
        maps = out["spatial_attention"][b].numpy()[mask]  # (n, h, w)
        slices = np.asarray(out[SLICE_INDICES_KEY][b])[mask] if SLICE_INDICES_KEY in out else np.flatnonzero(mask)
        boxes = np.asarray(out[PATCH_BOXES_KEY][b])[mask] if PATCH_BOXES_KEY in out else None
        geometry = out.get(GEOMETRY_KEY, [None] * (b + 1))[b]
        offset_z = int(geometry["crop_start"][2]) if geometry and "crop_start" in geometry else 0

        per_slice: dict[int, float] = {}
        for z, w in zip(slices.tolist(), weights.tolist()):
            per_slice[int(z)] = per_slice.get(int(z), 0.0) + float(w)
        ranked = sorted(per_slice.items(), key=lambda item: -item[1])
        files: dict[str, str] = {}
        if "image" in out:
            images = out["image"][b].numpy()[mask][:, 0]  # (n, S, S)
            order = np.argsort(-weights, kind="stable")[: self.top_k]
            self._overlay(images[order], maps[order], weights[order], slices[order] + offset_z, prob,
                          folder / "attention_top_slices.png", case)
            files["overlay"] = "attention_top_slices.png"
        if self.write_volume and geometry and "crop_start" in geometry:
            volume = self._attention_volume(maps, weights, slices, boxes, geometry)
            save_nifti_like_input(volume, geometry["input_affine"], geometry["original_affine"],
                                  folder / "attention.nii.gz", dtype=np.float32)
            files["attention_volume"] = "attention.nii.gz"
        report = {
            "case_id": case,
            "source": source,
            "probability": prob,
            "label": label,
            "label_name": self.class_names[label],
            "threshold": self.threshold,
            "num_instances": int(mask.sum()),
            "slices": [{"index": z + offset_z, "weight": round(w, 6)} for z, w in ranked],
            "files": files,
            "intended_use": "research only, not for clinical use",
        }
        write_json(report, folder / "prediction.json")
        return {"case_id": case, "source": source, "status": "ok", "probability": f"{prob:.6f}", "label": label,
                "label_name": self.class_names[label], "top_slice": ranked[0][0] + offset_z if ranked else "",
                "reason": ""}

    @staticmethod
    def _attention_volume(maps: np.ndarray, weights: np.ndarray, slices: np.ndarray, boxes: np.ndarray | None,
                          geometry: Mapping[str, Any]) -> np.ndarray:
        crop_shape = [int(s) for s in geometry["crop_shape"]]
        volume = np.zeros(crop_shape, dtype=np.float32)
        relative = _normalise(weights.astype(np.float32))
        for i, z in enumerate(slices.tolist()):
            x0, y0, x1, y1 = (0, 0, crop_shape[0], crop_shape[1]) if boxes is None else boxes[i].tolist()
            if x1 <= x0 or y1 <= y0:
                continue
            spatial = torch.as_tensor(maps[i], dtype=torch.float32)[None, None]
            if boxes is not None:  # a patch: its map covers the patch (cut where the patch was padded)
                size = max(x1 - x0, y1 - y0)
                full = F.interpolate(spatial, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
                full = full[: x1 - x0, : y1 - y0]
            else:
                full = F.interpolate(spatial, size=(x1 - x0, y1 - y0), mode="bilinear", align_corners=False)[0, 0]
            part = _normalise(full.numpy()) * relative[i]
            region = volume[x0:x1, y0:y1, z]
            np.maximum(region, part, out=region)
        start = np.asarray(geometry["crop_start"], dtype=int)
        box = (start, start + np.asarray(crop_shape))
        return uncrop(volume, box, [int(s) for s in geometry["input_shape"]], fill=0.0)

    def _overlay(self, images: np.ndarray, maps: np.ndarray, weights: np.ndarray, slices: np.ndarray, prob: float,
                 path: Path, case: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(images)
        figure, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
        for ax, image, spatial, weight, z in zip(axes[0], images, maps, weights, slices):
            size = image.shape[-1]
            up = F.interpolate(torch.as_tensor(spatial)[None, None].float(), size=image.shape[-2:],
                               mode="bilinear", align_corners=False)[0, 0].numpy()
            # x (toward the patient's left) horizontal, patient's right on the viewer's left, as in the QC montages.
            ax.imshow(image.T, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(_normalise(up).T, cmap="jet", alpha=0.35, vmin=0, vmax=1, extent=(-0.5, size - 0.5,
                                                                                         size - 0.5, -0.5))
            ax.set_title(f"slice {int(z)}, weight {float(weight):.3f}", fontsize=9)
            ax.axis("off")
        figure.suptitle(f"{case}: P({self.class_names[1]}) = {prob:.3f} - top {n} slices by attention "
                        "(research only)", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=80)
        plt.close(figure)

def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` (or ``_iteration=``) file with the largest ``N`` in ``ckpt_dir``, if any."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.search(p.name))]
    return max(found)[1] if found else None


class ResumeFromCheckpoint:
    """Resume training from the latest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` (written by MONAI's
    ``CheckpointSaver`` with ``save_interval``), when ``enabled`` and such a file exists; otherwise start afresh.

    The objects in ``load_dict`` (network, optimizer, lr scheduler) are restored, and the trainer continues at epoch
    ``N + 1`` (the epoch is read from the file name, so the trainer itself need not be in the checkpoint: a config
    cannot reference the trainer from its own handlers).

    Args:
        ckpt_dir: folder of the checkpoints.
        load_dict: objects to restore, as for ``CheckpointLoader``.
        enabled: whether to resume.
        map_location: device mapping for ``torch.load``.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: Mapping[str, Any], enabled: bool = True,
                 map_location: Any = "cpu") -> None:
        self.ckpt_dir, self.load_dict, self.enabled = ckpt_dir, dict(load_dict), enabled
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir) if self.enabled else None
        if path is None:
            return
        from monai.handlers import CheckpointLoader

        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location)(engine)
        if not any(value is engine for value in self.load_dict.values()):
            # the trainer state was not saved: continue after the epoch named in the file
            epoch = int(CHECKPOINT_PATTERN.search(path.name).group(1))
            engine.state.epoch = epoch
            engine.state.iteration = epoch * (engine.state.epoch_length or 0)
        logger.info("resumed from %s: continuing after epoch %d of %d", path, engine.state.epoch,
                    engine.state.max_epochs)


def require_checkpoint(path: str | os.PathLike) -> Path:
    """Return ``path`` when it is a file, else stop with a message saying how to get weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {path}: train the bundle first (python -m monai.bundle run training "
            "--config_file configs/train.yaml --dataset_dir DIR), or pass --ckpt_path to a model.pt "
            "(or --ckpt_dir to its folder)."
        )
    return path


def default_bundle_root(name: str) -> str:
    """The bundle folder, for ``bundle_root`` defaults that work from any current folder.

    In order: the folder of the first ``--config_file`` on the command line (``.../<bundle>/configs/x.yaml`` gives
    ``.../<bundle>``); the current folder when it holds ``configs/``; the repository's ``bundles/<name>`` when
    the project is installed in development mode; else the current folder. ``--bundle_root`` overrides all.
    """
    import ast
    import sys

    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            try:
                parsed = ast.literal_eval(value) if value.strip().startswith("[") else value
            except (ValueError, SyntaxError):
                parsed = value
            first = Path(parsed[0] if isinstance(parsed, (list, tuple)) else parsed).resolve()
            folder = first.parent
            return str(folder.parent if folder.name == "configs" else folder)
    cwd = Path.cwd()
    if (cwd / "configs").is_dir():
        return str(cwd)
    packaged = Path(__file__).resolve().parents[1] / "bundles" / name
    return str(packaged if packaged.is_dir() else cwd)
