"""Learning check: a small DA-CMIL configuration (ResNet-18, 128 px, k = 8, dual pooling) trained through the bundle
on a generated screening cohort separates COVID-19-like from bacterial-like phantoms on held-out cases.
Target: test AUC >= 0.90 in under 10 minutes on 2 CPU cores.

Status: NOT MET (shared, loaded 2-core CPU, 12 test cases): these settings gave test AUC 0.58 after 8 epochs (613 s).
More training bags helped: 72 bags at 64 px 0.81; 168 bags at 64 px, batch 8, backbone lr 1e-3, 6 epochs 0.86
(validation AUC 0.94 at epoch 3). Lesions are in the bags (38-100 % of kept slices); no pipeline bug was found.
Next: that setting with 10-12 epochs and/or k = 16, y-flips off (they remove the posterior cue), more test cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from chestct.phantoms import generate_cohort

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dacmil_covid_screening"  # benchmarks/learning/..
CONFIGS = BUNDLE / "configs"
SMALL = {"backbone": "resnet18", "pooling": "dual", "image_size": 128, "bag_size": 8, "batch_size": 8, "epochs": 8,
         "lr_milestones": [6], "num_workers": 0, "progress_bar": False, "val_folds": [0], "test_folds": [1],
         "seed": 0}


@pytest.mark.slow
def test_dual_pooling_learns_screening(tmp_path):
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, 48, task="screening", shape=(96, 96, 32), seed=11, num_folds=4, progress=False)
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
    print(f"learning check: test metrics {metrics}, {elapsed:.0f} s")
    assert metrics["num_cases"] == 12
    assert metrics["auc"] >= 0.90, metrics
    assert elapsed < 600
