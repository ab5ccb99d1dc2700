"""Writers for what a person reads or opens in a viewer: NIfTI in the input geometry, JSON, PNG montages."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from chestct.constants import HU_WINDOW_MAX, HU_WINDOW_MIN, LUNG_LEFT, LUNG_RIGHT  # noqa: E402
from chestct.io import reorient_to_original  # noqa: E402
from chestct.severity_metrics import roc_auc, roc_curve  # noqa: E402

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "PER_CASE_FIELDS",
    "CohortWriter",
    "EvaluationReport",
    "ScanRowsHandler",
    "save_nifti_like_input",
    "save_qc_montage",
    "save_roc_png",
    "uncrop",
    "write_cohort_csv",
    "write_csv",
    "write_json",
]

# Colour-blind-safe outline colours (Okabe-Ito): right lung orange, left lung sky blue, body box yellow.
RIGHT_COLOUR, LEFT_COLOUR, BOX_COLOUR = "#E69F00", "#56B4E9", "#F0E442"


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (numpy scalars and arrays converted), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n")
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], path: str | os.PathLike) -> Path:
    """One CSV row per record with the given columns (missing values empty, extra keys ignored).

    Args:
        rows: the records.
        fields: the columns, in order.
        path: output CSV path (parent folders created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    return path


def write_cohort_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], path: str | os.PathLike) -> Path:
    """The inference CSV: :func:`write_csv` of one row per scan, logging how many failed (``status`` not ok).

    Args:
        rows: per-scan records, each with a ``status`` (``"ok"`` or a failure).
        fields: the columns, in order.
        path: output CSV path (parent folders created).
    """
    path = write_csv(rows, fields, path)
    failed = sum(row.get("status") != "ok" for row in rows)
    logging.getLogger(__name__).info("inference: %d scans, %d failed; cohort CSV %s", len(rows), failed, path)
    return path


# The evaluation reports' per-case columns (a report may add its own after them).
PER_CASE_FIELDS = ("case_id", "source", "label", "label_name", "probability", "prediction", "correct")


class ScanRowsHandler:
    """Base of the bundles' evaluation and inference handlers: one row per scan over an engine run, written at its end.

    The rows are reset when the run starts; a subclass implements ``_on_iteration`` (add the rows of the engine's
    output) and ``_on_run_end`` (write the files).

    Args:
        output_dir: output folder.
        threshold: decision threshold on the class-1 probability, in [0, 1].
        class_names: names of classes 0 and 1.

    Raises:
        ValueError: for a threshold outside [0, 1] or not exactly two class names.
    """

    def __init__(self, output_dir: str | os.PathLike, threshold: float, class_names: Sequence[str]) -> None:
        if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
        if isinstance(class_names, str) or len(class_names) != 2:
            raise ValueError(f"class_names must name classes 0 and 1, got {class_names!r}.")
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.class_names = list(class_names)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_run_end)

    def _on_iteration(self, engine: Engine) -> None:
        raise NotImplementedError

    def _on_run_end(self, engine: Engine) -> None:
        raise NotImplementedError

    def prediction_fields(self, probability: float | None, label: int | None = None) -> dict[str, Any]:
        """The per-case CSV columns of a class-1 ``probability`` and a true ``label`` (empty where unknown).

        Returns:
            ``probability`` (6 decimals), ``prediction`` (0/1 at the threshold), ``label``, ``label_name`` (of the
            true label) and ``correct`` (0/1 when both are known).
        """
        prediction = None if probability is None else int(probability >= self.threshold)
        return {
            "probability": "" if probability is None else f"{probability:.6f}",
            "prediction": "" if prediction is None else prediction,
            "label": "" if label is None else label,
            "label_name": "" if label is None else self.class_names[label],
            "correct": "" if prediction is None or label is None else int(prediction == label),
        }


class CohortWriter(ScanRowsHandler):
    """Base of the bundles' inference handlers: outputs per scan and ``output_dir/predictions.csv`` for the cohort.

    A subclass sets ``csv_fields`` and implements ``_on_iteration``, which hands each scan of the engine's output to
    :meth:`_record`. A scan that failed upstream (its ``error``) or whose outputs cannot be written is listed with
    ``status=failed`` and the reason; the others go on. The rows are reset at every run of the engine.

    Args:
        output_dir: output folder.
        threshold: decision threshold on the class-1 probability, in [0, 1].
        class_names: names of classes 0 and 1.
    """

    csv_fields: Sequence[str] = ("case_id", "source", "status", "reason")

    def _record(self, case: str, source: Any, error: str | None, write: Callable[[], dict[str, Any]]) -> None:
        """Append the row of one scan: ``write()`` (its outputs, returning the CSV row) unless ``error`` is set."""
        if error:
            logging.getLogger(__name__).warning("scan %s failed: %s", case, error)
            self.rows.append({"case_id": case, "source": source, "status": "failed", "reason": error})
            return
        try:
            self.rows.append(write())
        except Exception as failure:  # noqa: BLE001 - one scan's writer failure must not stop the cohort
            logging.getLogger(__name__).exception("writing the outputs of %s failed", case)
            self.rows.append({"case_id": case, "source": source, "status": "failed",
                              "reason": f"writing outputs failed: {type(failure).__name__}: {failure}"})

    def _on_run_end(self, engine: Engine) -> None:
        write_cohort_csv(self.rows, self.csv_fields, self.output_dir / "predictions.csv")


class EvaluationReport(ScanRowsHandler):
    """Base of the bundles' evaluation handlers: metrics over the labelled scans, published to the engine.

    A subclass collects its rows in ``_on_iteration`` and, at the run's end, computes ``metrics`` and hands them to
    :meth:`publish`, which puts the finite scalar ones into ``engine.state.metrics`` (for the stats handlers and the
    key metric) under ``prefix``.

    Args:
        output_dir: folder of the report.
        threshold: decision threshold on the class-1 probability, in [0, 1].
        class_names: names of classes 0 and 1.
        prefix: prefix of the metric names in ``engine.state.metrics``.
    """

    def __init__(
        self, output_dir: str | os.PathLike, threshold: float, class_names: Sequence[str], prefix: str = "test_"
    ) -> None:
        super().__init__(output_dir, threshold, class_names)
        self.prefix = prefix
        self.metrics: dict[str, Any] = {}

    def publish(self, engine: Engine, metrics: Mapping[str, Any], num_scans: int) -> None:
        """Keep ``metrics`` as :attr:`metrics`, copy its finite scalars to the engine and log them."""
        self.metrics = dict(metrics)
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
        for key, value in scalars.items():
            engine.state.metrics[self.prefix + key] = value
        logging.getLogger(__name__).info("evaluation on %d scans: %s", num_scans,
                                         {k: round(v, 4) for k, v in scalars.items()})


def save_roc_png(
    probabilities: Sequence[float], labels: Sequence[int], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write the ROC curve of the class-1 probability, with its AUC in the legend, as a PNG.

    Args:
        probabilities: class-1 probability per case, shape (num_cases,).
        labels: true labels 0/1 (both classes present), shape (num_cases,).
        path: output PNG path (parent folders created).
        title: plot title (default: the number of cases).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fpr, tpr = roc_curve(probabilities, labels)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, color="#0072B2", lw=2, label=f"AUC = {roc_auc(probabilities, labels):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or f"ROC, {len(list(labels))} cases", fontsize=9)
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def uncrop(array: np.ndarray, box: Sequence[Sequence[int]], shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Place a cropped ``(X, Y, Z)`` array back into a volume of ``shape`` at ``box = (start, end)``."""
    start, end = (np.asarray(b, dtype=int) for b in box)
    if tuple(end - start) != tuple(array.shape):
        raise ValueError(f"array of shape {array.shape} does not fit the box {start.tolist()}..{end.tolist()}.")
    full = np.full(tuple(shape), fill, dtype=array.dtype)
    full[tuple(slice(s, e) for s, e in zip(start, end))] = array
    return full


def save_nifti_like_input(
    array: np.ndarray,
    affine: np.ndarray,
    original_affine: np.ndarray,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Save a canonical ``(X, Y, Z)`` array as NIfTI on the input file's voxel grid (same orientation and affine).

    Args:
        array: data in the canonical (LPS) voxel order of :func:`chestct.io.load_ct`, full input extent.
        affine: the canonical array's voxel-to-RAS affine (``meta["affine"]`` before any crop).
        original_affine: the input file's affine (``meta["original_affine"]``).
        path: output ``.nii.gz`` path.
        dtype: stored data type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = reorient_to_original(np.asarray(array), np.asarray(affine), np.asarray(original_affine)).astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(original_affine, dtype=float))
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def save_qc_montage(
    hu: np.ndarray,
    lungs: np.ndarray | None,
    path: str | os.PathLike,
    body_box: Sequence[Sequence[int]] | None = None,
    num_slices: int = 8,
    title: str = "",
    window: tuple[float, float] = (HU_WINDOW_MIN, HU_WINDOW_MAX),
) -> Path:
    """A PNG of axial slices spread over the lungs, with lung outlines and the body crop box.

    Args:
        hu: CT in HU, ``(X, Y, Z)``, canonical LPS order (shown with anterior up and the patient's right on the
            viewer's left, the radiological convention).
        lungs: lung labels on the same grid (1 right, 2 left), or ``None``.
        path: output PNG path.
        body_box: ``(start, end)`` of the body crop on this grid, drawn as a rectangle.
        num_slices: how many slices to show.
        title: figure title.
        window: display window in HU.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    depth = hu.shape[2]
    has_lungs = lungs is not None and lungs.any()
    if has_lungs:
        zs = np.flatnonzero(lungs.any(axis=(0, 1)))
        picks = np.linspace(zs[0], zs[-1], num=min(num_slices, zs.size)).round().astype(int)
    else:
        picks = np.linspace(0, depth - 1, num=min(num_slices, depth)).round().astype(int)
    columns = min(4, len(picks))
    rows = int(np.ceil(len(picks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), picks[::-1]):  # top of the chest first
        # Canonical x runs toward the patient's left: transposing puts it on the screen's horizontal axis with
        # the patient's right on the viewer's left, and y (posterior) downward.
        ax.imshow(hu[:, :, z].T, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        if has_lungs:
            for value, colour in ((LUNG_RIGHT, RIGHT_COLOUR), (LUNG_LEFT, LEFT_COLOUR)):
                if (lungs[:, :, z] == value).any():
                    ax.contour((lungs[:, :, z] == value).T, levels=[0.5], colors=colour, linewidths=1.0)
        if body_box is not None:
            (x0, y0, _), (x1, y1, _) = body_box
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=BOX_COLOUR, lw=1.0))
        ax.set_title(f"slice {z}", fontsize=9)
    legend = "outlines: right lung orange, left lung blue; yellow box: body crop"
    figure.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
