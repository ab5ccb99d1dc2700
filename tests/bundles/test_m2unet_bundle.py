"""End-to-end smoke test of the M2UNet severity bundle: train one tiny epoch, resume, evaluate, infer (phantoms).

Every command runs as a user would type it (``python -m monai.bundle run ...``): training from the bundle folder,
evaluation and inference from another folder with ``--bundle_root``. Everything is written under ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from chestct.constants import LOBE_NAMES
from chestct.phantoms import generate_cohort

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "m2unet_covid_severity"
# A network and bags small enough for one CPU epoch in seconds.
TINY = [
    "--num_patches", "4", "--patch_size", "64", "--features", "8", "--bottleneck_features", "16",
    "--emb_concepts", "8", "--img_concepts", "8", "--num_workers", "0", "--progress_bar", "False",
    "--augment_prob", "0.5",  # the training bags go through RandPatchAffined
]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    return result


def _check(result: subprocess.CompletedProcess) -> str:
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{BUNDLE / 'configs' / n}'" for n in names) + "]"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m2unet_cohort")
    # 6 cases, 3 folds: test fold 0, validation fold 1, training fold 2, each with both classes.
    generate_cohort(root, 6, task="severity", shape=(96, 96, 24), seed=1, num_folds=3, severe_fraction=0.5,
                    progress=False)
    return root


def _bundle_files() -> set[str]:
    return {str(p.relative_to(BUNDLE)) for p in BUNDLE.rglob("*") if "__pycache__" not in p.parts}


def test_train_resume_evaluate_infer(cohort: Path, tmp_path: Path) -> None:
    before = _bundle_files()
    models, out = tmp_path / "models", tmp_path / "out"
    train = ["--config_file", "configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir", str(out / "train"),
             "--ckpt_dir", str(models), *TINY]

    # 1. one tiny epoch from the bundle folder (bundle_root defaults to it)
    _check(_run(["training", *train, "--max_epochs", "1"], cwd=BUNDLE))
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    assert any((out / "train").glob("events.out.tfevents.*")), "no TensorBoard log"

    # 2. resumable: a second run with 2 epochs continues from epoch 1
    log = _check(_run(["training", *train, "--max_epochs", "2"], cwd=BUNDLE))
    assert "resumed from" in log and "checkpoint_epoch=1.pt" in log
    assert (models / "checkpoint_epoch=2.pt").is_file()

    # 3. evaluation from elsewhere with --bundle_root: Table II + Table III metrics, per-case CSV, ROC PNG
    common = ["--bundle_root", str(BUNDLE), "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
              "--logging_file", str(BUNDLE / "configs" / "logging.conf"), "--ckpt_dir", str(models), *TINY]
    _check(_run(["evaluating", "--config_file", _configs("train.yaml", "evaluate.yaml"), "--dataset_dir",
                 str(cohort), "--output_dir", str(out / "eval"), *common], cwd=tmp_path))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    for key in ("accuracy", "precision", "recall", "f1", "auc", "lobe_mean_dsc", "lobe_mean_sensitivity",
                "lobe_mean_ppv"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, (key, metrics)
    for name in LOBE_NAMES.values():
        assert f"lobe_{name}_dsc" in metrics
    assert metrics["num_cases"] == 2.0
    with open(out / "eval" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case_id"] for r in rows] == ["case_000", "case_005"]
    assert (out / "eval" / "roc.png").stat().st_size > 0

    # 4. inference on a folder with one good and one broken scan
    scans = tmp_path / "scans"
    scans.mkdir()
    image = cohort / "images" / "case_000.nii.gz"
    (scans / "case_000.nii.gz").write_bytes(image.read_bytes())
    (scans / "broken.nii.gz").write_text("not a scan")
    _check(_run(["inference", "--config_file", _configs("train.yaml", "inference.yaml"), "--dataset_dir",
                 str(scans), "--output_dir", str(out / "infer"), "--infer_num_draws", "3", *common], cwd=tmp_path))
    with open(out / "infer" / "predictions.csv") as handle:
        rows = {r["case_id"]: r for r in csv.DictReader(handle)}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"]
    assert rows["case_000"]["status"] == "ok"
    report = json.loads((out / "infer" / "case_000" / "prediction.json").read_text())
    assert 0.0 <= report["probability_severe"] <= 1.0 and report["num_draws"] == 3
    assert set(report["lobe_volumes_ml"]) == set(LOBE_NAMES.values())
    lobes, reference = nib.load(out / "infer" / "case_000" / "lobes.nii.gz"), nib.load(image)
    assert lobes.shape == reference.shape
    np.testing.assert_allclose(lobes.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lobes.dataobj)).tolist()) <= set(range(6))
    assert (out / "infer" / "case_000" / "overlay.png").stat().st_size > 0

    # 5. a clear error without weights
    result = _run(["inference", "--config_file", _configs("train.yaml", "inference.yaml"), "--dataset_dir",
                   str(scans), "--output_dir", str(out / "noweights"), *common[:-len(TINY)],
                   "--ckpt_path", str(tmp_path / "missing" / "model.pt"), *TINY], cwd=tmp_path)
    assert result.returncode != 0
    assert "no trained weights at" in result.stdout + result.stderr

    # never writes into the source tree
    assert _bundle_files() == before


@pytest.mark.parametrize("variant", ["classification_only", "segmentation_only"])
def test_variant_overlays_train(variant: str, cohort: Path, tmp_path: Path) -> None:
    result = _run(["training", "--config_file", _configs("train.yaml", f"variants/{variant}.yaml"),
                   "--bundle_root", str(BUNDLE), "--dataset_dir", str(cohort), "--output_dir", str(tmp_path / "out"),
                   "--ckpt_dir", str(tmp_path / "models"), "--max_epochs", "1", *TINY], cwd=tmp_path)
    log = _check(result)
    key = "val_auc" if variant == "classification_only" else "val_mean_dice"
    assert f"Key metric: {key}" in log
    assert (tmp_path / "models" / "model.pt").is_file()


def test_ddp_two_cpu_processes_gloo(cohort: Path, tmp_path: Path) -> None:
    """The multi-GPU overlay runs as two CPU processes on gloo (what CI can check of it)."""
    models = tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "monai.bundle", "run", "training", "--config_file", _configs("train.yaml", "multi_gpu_train.yaml"),
         "--bundle_root", str(BUNDLE), "--dataset_dir", str(cohort), "--output_dir", str(tmp_path / "out"),
         "--ckpt_dir", str(models), "--max_epochs", "1", *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()


@pytest.mark.parametrize("pooling, temperature, expected", [("max", 0.1, (0.1, 0.1)), ("lse", [0.1, 2.0], (0.1, 2.0))])
def test_gcp_keys_reach_the_network(pooling: str, temperature, expected: tuple[float, float]) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"gcp_pooling": pooling, "gcp_temperature": temperature, "device": "$torch.device('cpu')",
                   "features": 8, "bottleneck_features": 16, "emb_concepts": 8, "img_concepts": 8})
    net = parser.get_parsed_content("network_def")
    assert (net.emb_gcp.pooling, net.img_gcp.pooling) == (pooling, pooling)
    assert (net.emb_gcp.temperature, net.img_gcp.temperature) == expected


@pytest.mark.parametrize("factor, concept_factor", [(1.0, 1.0), (0.2, 1.0), (1.0, 0.1)])
def test_head_lr_factors_reach_the_optimizer(factor: float, concept_factor: float) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"head_lr_factor": factor, "concept_lr_factor": concept_factor, "learning_rate": 0.01,
                   "device": "$torch.device('cpu')", "features": 8, "bottleneck_features": 16, "emb_concepts": 8,
                   "img_concepts": 8})
    optimizer = parser.get_parsed_content("optimizer")
    expected = [0.01, 0.01 * factor, 0.01 * factor * concept_factor]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)


def test_regularisation_keys_reach_the_network_and_the_bags() -> None:
    from monai.bundle import ConfigParser

    from chestct.bag_augment import RandPatchAffined

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"mil_norm": "layer", "dropout": 0.3, "augment_prob": 0.5, "device": "$torch.device('cpu')",
                   "features": 8, "bottleneck_features": 16, "emb_concepts": 8, "img_concepts": 8})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net.emb_fc[1], torch.nn.LayerNorm) and isinstance(net.img_fc[1], torch.nn.LayerNorm)
    assert net.dropout.p == 0.3
    augment = [t for t in parser.get_parsed_content("train#random") if isinstance(t, RandPatchAffined)]
    assert len(augment) == 1 and augment[0].prob == 0.5
