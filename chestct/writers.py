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

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CohortWriter", "save_nifti_like_input", "save_qc_montage", "uncrop", "write_cohort_csv", "write_json"]

# Colour-blind-safe outline colours (Okabe-Ito): right lung orange, left lung sky blue, body box yellow.
RIGHT_COLOUR, LEFT_COLOUR, BOX_COLOUR = "#E69F00", "#56B4E9", "#F0E442"


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (numpy scalars and arrays converted), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n")
    return path


def write_cohort_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], path: str | os.PathLike) -> Path:
    """One CSV row per scan with the given columns (missing values empty, extra keys ignored); logs the failures.

    Args:
        rows: per-scan records, each with a ``status`` (``"ok"`` or a failure) when failures are to be counted.
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
    failed = sum(row.get("status") != "ok" for row in rows)
    logging.getLogger(__name__).info("inference: %d scans, %d failed; cohort CSV %s", len(rows), failed, path)
    return path


class CohortWriter:
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

    def __init__(self, output_dir: str | os.PathLike, threshold: float, class_names: Sequence[str]) -> None:
        if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.class_names = list(class_names)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write_csv)

    def _on_iteration(self, engine: Engine) -> None:
        raise NotImplementedError

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

    def _write_csv(self, engine: Engine) -> None:
        write_cohort_csv(self.rows, self.csv_fields, self.output_dir / "predictions.csv")


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
