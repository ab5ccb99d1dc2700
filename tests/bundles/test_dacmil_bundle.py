"""End-to-end runs of the DA-CMIL bundle (training, evaluation, inference, DDP, metadata, network I/O) on a tiny
synthetic screening cohort in a temporary folder. Nothing is written into the source tree."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch

from chestct.phantoms import generate_cohort

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dacmil_covid_screening"
CONFIGS = BUNDLE / "configs"
# A tiny configuration: ResNet-10, 64 px, k = 4, one epoch, no worker processes.
TINY = {"backbone": "resnet10", "image_size": 64, "bag_size": 4, "batch_size": 4, "epochs": 1, "num_workers": 0,
        "progress_bar": False, "val_folds": [0], "test_folds": [1]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 8, task="screening", shape=(64, 64, 24), seed=3, num_folds=4, progress=False)
    return folder


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> dict:
    """Train once for the module; returns the folders."""
    from monai.bundle import ConfigWorkflow

    run = tmp_path_factory.mktemp("run")
    paths = {"output_dir": str(run / "out"), "ckpt_dir": str(run / "models"), "dataset_dir": str(cohort),
             "bundle_root": str(BUNDLE)}
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), run_id="training", logging_file=False,
                              **paths, **TINY)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return paths


def _workflow(configs, run_id, **overrides):
    from monai.bundle import ConfigWorkflow

    files = [str(CONFIGS / c) for c in configs]
    return ConfigWorkflow(config_file=files, run_id=run_id, logging_file=False, workflow_type=None,
                          **{**TINY, **overrides})


def test_training_outputs(trained):
    models = Path(trained["ckpt_dir"])
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("backbone.") for k in state) and "classifier.weight" in state
    out = Path(trained["output_dir"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "cache").rglob("*.pt"))  # the preprocessing cache
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    assert metrics["num_cases"] == 2
    assert not (BUNDLE / "eval").exists()


def test_resume_continues_from_last_checkpoint(trained):
    workflow = _workflow(["train.yaml"], "training", **trained, epochs=2)
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * trainer.state.epoch_length
    assert (Path(trained["ckpt_dir"]) / "checkpoint_epoch=2.pt").is_file()


def test_evaluation(trained):
    workflow = _workflow(["train.yaml", "evaluate.yaml"], "evaluating", **trained)
    workflow.initialize()
    workflow.run()
    folder = Path(trained["output_dir"]) / "evaluation"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_cases"] == 2
    for key in ("accuracy", "auc", "f1", "specificity", "sensitivity"):
        assert key in metrics
    assert np.asarray(metrics["confusion_matrix"]).sum() == 2
    rows = list(csv.DictReader(open(folder / "per_case.csv")))
    assert len(rows) == 2 and all(0 <= float(r["probability"]) <= 1 for r in rows)
    assert (folder / "roc.png").stat().st_size > 0


def test_inference_with_a_bad_scan(trained, cohort, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        (scans / name).symlink_to(cohort / "images" / name)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "infer"
    workflow = _workflow(["train.yaml", "inference.yaml"], "inference", **{**trained, "dataset_dir": str(scans),
                                                                          "output_dir": str(out)})
    workflow.initialize()
    workflow.run()
    rows = {r["case_id"]: r for r in csv.DictReader(open(out / "inference" / "predictions.csv"))}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"]
    for case in ("case_000", "case_001"):
        assert rows[case]["status"] == "ok"
        report = json.loads((out / "inference" / case / "prediction.json").read_text())
        assert 0.0 <= report["probability"] <= 1.0 and report["label"] in (0, 1)
        weights = [s["weight"] for s in report["slices"]]
        assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(1.0, abs=1e-3)
        attention = nib.load(out / "inference" / case / "attention.nii.gz")
        source = nib.load(cohort / "images" / f"{case}.nii.gz")
        assert attention.shape == source.shape and np.allclose(attention.affine, source.affine)
        lungs = nib.load(cohort / "labels" / f"{case}_lungs.nii.gz").get_fdata() > 0
        values = attention.get_fdata()
        # attention lies on slices that hold lung (it is cropped to the lungs' box)
        assert values.max() == pytest.approx(1.0, abs=1e-4)
        assert set(np.flatnonzero(values.any(axis=(0, 1)))) <= set(np.flatnonzero(lungs.any(axis=(0, 1))))
        assert (out / "inference" / case / "attention_top_slices.png").stat().st_size > 0


def _cli(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_from_elsewhere_without_weights_stops_clearly(cohort, tmp_path):
    result = _cli(["run", "inference", "--config_file",
                   f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'inference.yaml'}']",
                   "--bundle_root", str(BUNDLE), "--dataset_dir", str(cohort / "images"),
                   "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "none")], cwd=tmp_path)
    assert result.returncode != 0
    assert "no trained weights" in result.stdout + result.stderr


def test_metadata_and_network_io():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    schema = json.loads((BUNDLE.parent / "metadata_schema.json").read_text())
    jsonschema.validate(meta, schema)
    assert meta["intended_use"] == "research only, not for clinical use"
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"] == "2.13.0"
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "train.yaml"), backbone="resnet10")


def test_ddp_two_cpu_processes_gloo(cohort, tmp_path):
    overrides = []
    for key, value in {**TINY, "epochs": 1}.items():
        overrides += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "monai.bundle", "run", "training", "--config_file",
         f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']", "--dataset_dir", str(cohort),
         "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models"), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
