"""Tests of the shared handler bases: per-scan failures are recorded with their reason and the cohort goes on;
per-case prediction columns; evaluation metrics published to the engine."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from chestct.writers import CohortWriter, EvaluationReport


class _Writer(CohortWriter):
    csv_fields = ("case_id", "source", "status", "value", "reason")

    def _on_iteration(self, engine) -> None:
        out = engine.state.output
        self._record(out["case_id"], out["source"], out.get("error"), lambda: self._write(out))

    def _write(self, out) -> dict:
        if out["value"] < 0:
            raise OSError("disk full")
        return {"case_id": out["case_id"], "source": out["source"], "status": "ok", "value": out["value"]}


def _engine(output: dict) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(output=output))


def test_failures_are_rows_and_the_cohort_goes_on(tmp_path: Path) -> None:
    writer = _Writer(tmp_path, threshold=0.5, class_names=("a", "b"))
    for output in ({"case_id": "ok1", "source": "s1", "value": 3},
                   {"case_id": "bad_input", "source": "s2", "value": 1, "error": "not a CT"},
                   {"case_id": "bad_write", "source": "s3", "value": -1},
                   {"case_id": "ok2", "source": "s4", "value": 4}):
        writer._on_iteration(_engine(output))
    writer._on_run_end(None)
    with open(tmp_path / "predictions.csv") as handle:
        rows = {r["case_id"]: r for r in csv.DictReader(handle)}
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "failed", "ok"]
    assert rows["bad_input"]["reason"] == "not a CT"
    assert rows["bad_write"]["reason"] == "writing outputs failed: OSError: disk full"
    assert rows["ok2"]["value"] == "4" and rows["ok2"]["reason"] == ""


@pytest.mark.parametrize("threshold", [-0.1, 1.5, True])
def test_bad_threshold(tmp_path: Path, threshold) -> None:
    with pytest.raises(ValueError, match="threshold"):
        _Writer(tmp_path, threshold=threshold, class_names=("a", "b"))


@pytest.mark.parametrize("class_names", [("only_one",), ("a", "b", "c"), "ab"])
def test_bad_class_names(tmp_path: Path, class_names) -> None:
    with pytest.raises(ValueError, match="class_names"):
        _Writer(tmp_path, threshold=0.5, class_names=class_names)


@pytest.mark.parametrize(
    "probability, label, expected",
    [
        (0.7, 1, {"probability": "0.700000", "prediction": 1, "label": 1, "label_name": "severe", "correct": 1}),
        (0.3, 1, {"probability": "0.300000", "prediction": 0, "label": 1, "label_name": "severe", "correct": 0}),
        (0.6, None, {"probability": "0.600000", "prediction": 0, "label": "", "label_name": "", "correct": ""}),
        (None, 0, {"probability": "", "prediction": "", "label": 0, "label_name": "mild", "correct": ""}),
    ],
)
def test_prediction_fields(tmp_path: Path, probability, label, expected) -> None:
    writer = _Writer(tmp_path, threshold=0.65, class_names=("mild", "severe"))
    assert writer.prediction_fields(probability, label) == expected


def test_publish_keeps_finite_scalars(tmp_path: Path) -> None:
    report = EvaluationReport(tmp_path, threshold=0.5, class_names=("a", "b"), prefix="val_")
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    metrics = {"auc": float("nan"), "accuracy": 0.75, "num_cases": 4, "confusion_matrix": [[1, 0], [1, 2]]}
    report.publish(engine, metrics, num_scans=4)
    assert engine.state.metrics == {"val_accuracy": 0.75, "val_num_cases": 4.0}
    assert report.metrics == metrics
