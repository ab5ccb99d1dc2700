"""Learning check (issue 3, in CI): a small DA-CMIL configuration (ResNet-10, 128 px, k = 16, dual pooling, lambda
0.5) trained through the bundle on a generated screening cohort separates COVID-19-like from bacterial-like phantoms
on held-out cases: test AUC >= 0.90 in under 10 minutes on 2 CPU cores.

Cohort: 120 phantoms of 96 x 96 x 32 voxels, 4 stratified folds: 60 training bags, 30 validation (best checkpoint by
AUC, the later of equal ones), 30 test. The backbone starts from scratch, so it learns at the head's rate (1e-3);
batches of 4 bags give 15 steps per epoch; 12 epochs with the x0.1 step after epoch 8, which is what steadies the
validation AUC. Measured numbers (cohort seeds, wall times, settings that did not reach the target) are in the
bundle README ("Performance"); another cohort seed is one environment variable away:

    DACMIL_LEARNING_SEED=11 .venv/bin/python -m pytest -s tests/bundles/test_dacmil_learning.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from chestct.phantoms import generate_cohort

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dacmil_covid_screening"
CONFIGS = BUNDLE / "configs"
NUM_CASES, TEST_CASES = 120, 30
# the cohort's seed; another one (DACMIL_LEARNING_SEED) checks that the result is not one cohort's luck
COHORT_SEED = int(os.environ.get("DACMIL_LEARNING_SEED", 12))
SMALL = {"backbone": "resnet10", "pooling": "dual", "lam": 0.5, "image_size": 128, "bag_size": 16, "batch_size": 4,
         "backbone_lr": 1e-3, "head_lr": 1e-3, "epochs": 12, "lr_milestones": [8], "num_workers": 0,
         "progress_bar": False, "val_folds": [0], "test_folds": [1], "seed": 0}
TARGET_AUC = 0.90
TIME_LIMIT_S = 600.0


@pytest.mark.slow
def test_dual_pooling_learns_screening(tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, NUM_CASES, task="screening", shape=(96, 96, 32), seed=COHORT_SEED, num_folds=4,
                    progress=False)
    paths = {"dataset_dir": str(cohort), "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "models"),
             "bundle_root": str(BUNDLE)}
    for configs, run_id in ((["train.yaml"], "training"), (["train.yaml", "evaluate.yaml"], "evaluating")):
        workflow = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], run_id=run_id,
                                  logging_file=False, workflow_type=None, **paths, **SMALL)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    metrics = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    elapsed = time.perf_counter() - start
    print(f"DA-CMIL learning check: test metrics {metrics}, {elapsed:.0f} s")
    assert metrics["num_cases"] == TEST_CASES
    assert metrics["auc"] >= TARGET_AUC, metrics
    assert elapsed < TIME_LIMIT_S, f"{elapsed:.0f} s"
