"""The lung_ct_segmentation bundle end to end on phantoms in a temporary folder: build the 2D set, train one tiny
epoch, export TorchScript, evaluate and infer (python -m monai.bundle run ...; never writes into the source tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from chestct.lungseg_data import build_dataset
from chestct.lungseg_model import ModelLungMask
from chestct.phantoms import make_phantom, phantom_affine

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "lung_ct_segmentation"
CONFIGS = BUNDLE / "configs"
SCHEMA = BUNDLE.parent / "metadata_schema.json"


def _bundle(*args: str, cwd: Path) -> str:
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _config(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


@pytest.fixture(scope="module")
def phantom_scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    cases = []
    for seed in (1, 2):
        phantom = make_phantom(0, "screening", shape=(64, 64, 12), seed=seed, effusion_probability=1.0)
        affine = phantom_affine(phantom.spacing, phantom.origin)
        nib.save(nib.Nifti1Image(phantom.image, affine), folder / f"case{seed}.nii.gz")
        nib.save(nib.Nifti1Image(phantom.lungs, affine), folder.parent / f"case{seed}_lungs.nii.gz")
        cases.append({"image": str(folder / f"case{seed}.nii.gz"),
                      "label": str(folder.parent / f"case{seed}_lungs.nii.gz")})
    (folder.parent / "test_volumes.json").write_text(json.dumps({"test": cases}))
    return folder


def _assert_starts_from(checkpoint: Path, overrides: list[str]) -> None:
    import torch
    from monai.bundle import ConfigWorkflow

    settings = dict(zip((k.lstrip("-") for k in overrides[::2]), overrides[1::2]))
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.yaml"), workflow_type=None, logging_file=False,
                              init_ckpt=str(checkpoint), **settings)
    workflow.initialize()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved = saved.get("model", saved)
    loaded = workflow.parser.get_parsed_content("network_def").state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].cpu(), value, msg=key)


@pytest.mark.slow
def test_train_export_evaluate_infer(tmp_path: Path, phantom_scans: Path) -> None:
    data = tmp_path / "data"
    build_dataset(data, num_phantoms=2, num_val_phantoms=1, include_real=False, phantom_slice_step=6)
    models, out = tmp_path / "models", tmp_path / "eval"
    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(data), "--ckpt_dir", str(models),
              "--output_dir", str(out)]
    # train: one tiny epoch from another folder (bundle_root given)
    _bundle("run", "training", "--config_file", _config("train.yaml"), *common, "--max_epochs", "1",
            "--epoch_length", "2", "--batch_size", "2", "--progress_bar", "False", "--num_threads", "2",
            cwd=tmp_path)
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert list(out.glob("events.out.tfevents*"))
    # fine-tuning starts from the given checkpoint's weights
    _assert_starts_from(models / "model.pt", common)
    # export TorchScript and load it through the chestct model method
    _bundle("ckpt_export", "network_def", "--filepath", str(models / "model.ts"), "--ckpt_file",
            str(models / "model.pt"), "--key_in_ckpt", "model", "--meta_file", str(CONFIGS / "metadata.json"),
            "--config_file", str(CONFIGS / "train.yaml"), "--bundle_root", str(BUNDLE), cwd=tmp_path)
    segmenter = ModelLungMask(models / "model.ts", device="cpu")
    labels = segmenter(np.full((40, 40, 3), -1000.0, np.float32))
    assert labels.shape == (40, 40, 3) and labels.dtype == np.uint8
    # evaluate on phantom volumes (Dice per lung, HD95, volume error), from the bundle folder
    _bundle("run", "evaluating", "--config_file", _config("train.yaml", "evaluate.yaml"), "--dataset_dir",
            str(data), "--ckpt_dir", str(models), "--output_dir", str(out / "test"), "--eval_datalist",
            str(phantom_scans.parent / "test_volumes.json"), cwd=BUNDLE)
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["num_cases"] == 2
    for key in ("dice_right", "dice_left", "hd95_mm_right", "volume_error_ml_left"):
        assert key in metrics
    assert (out / "test" / "per_case.csv").is_file()
    # infer: lung label NIfTI in each input's geometry
    _bundle("run", "inference", "--config_file", _config("train.yaml", "inference.yaml"), *common[:2],
            "--dataset_dir", str(phantom_scans), "--ckpt_dir", str(models), "--output_dir", str(out / "infer"),
            cwd=tmp_path)
    for seed in (1, 2):
        source = nib.load(phantom_scans / f"case{seed}.nii.gz")
        mask = nib.load(out / "infer" / f"case{seed}_lungs.nii.gz")
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert "case1" in (out / "infer" / "lung_volumes.csv").read_text()


@pytest.mark.slow
def test_metadata_validates(tmp_path: Path) -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"no metadata schema at {SCHEMA}")
    _bundle("verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"), "--filepath", str(SCHEMA),
            cwd=tmp_path)


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path: Path) -> None:
    """The multi-GPU overlay runs as two CPU processes on gloo (what CI can check of it)."""
    data = tmp_path / "data"
    build_dataset(data, num_phantoms=2, num_val_phantoms=1, include_real=False, phantom_slice_step=6)
    models = tmp_path / "models"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "monai.bundle", "run", "training", "--config_file", _config("train.yaml", "multi_gpu_train.yaml"),
         "--bundle_root", str(BUNDLE), "--dataset_dir", str(data), "--ckpt_dir", str(models), "--output_dir",
         str(tmp_path / "out"), "--max_epochs", "1", "--epoch_length", "2", "--batch_size", "2",
         "--progress_bar", "False", "--num_threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (models / "model.pt").is_file()
