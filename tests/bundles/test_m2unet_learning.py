"""Learning check (issue 5, in CI): the M2UNet severity bundle's own training and evaluation (``ConfigWorkflow`` on
configs/train.yaml + evaluate.yaml) reach test AUC >= 0.90 and mean lobe Dice >= 0.80 on a generated severity cohort,
in under 10 minutes on a 2-core CPU.

Small sizes, every one a command-line-style override of the bundle's settings (see LEARNING below; each can be
changed through an ``M2U_*`` environment variable): phantoms of 64 x 64 x 24 voxels so that a 64 x 64 patch is a
whole axial slice (the phantoms draw no fissures: a lobe boundary is only inferable from the whole slice's anatomy;
at 48 x 48 the 7 mm pixels blur the lesions into the lung and the AUC missed 0.90 on one cohort in five), 384
training / 8 validation / 192 test scans with both classes balanced (severe_fraction 0.5: the paper balances severe
cases by duplication). Many training scans because a few dozen are memorised; 192 test scans because the AUC of a
test split is noisy (standard error about 0.02 at 192 scans). Bags of 6 patches, 8 bags per step, the decoder on 3
random patches of each bag (``seg_patches_per_bag``: a third less time, lobes as good), about 1500 steps (rounded up
to whole epochs), a network 4x narrower than the paper's with a 128-channel fifth block, smooth-maximum GCP
(``lse``) at temperature 5 (close to the mean over instances: the severity label is the lesion burden, an amount,
not the worst slice), Adam (lr 0.002) with the bundle's poly decay instead of SGD (the short schedule), the MIL head
at a fifth of that rate (``head_lr_factor`` 0.2: at the full rate the severity loss can sit at ln 2 for most of the
run) and severity loss weight 5 instead of 0.01 (at 1 the shared encoder follows the lobes and the severity loss
stays at ln 2; at 10 the lobes fall short). Two regularisers of the MIL head: a layer norm after each MIL level's
1x1 layer (``mil_norm``: the GCP cosines differ between scans by hundredths) and dropout 0.5 before the classifier
(without it the severity branch learned the training scans: training AUC 0.98, test 0.92, in one run). The
evaluation is the bundle's: 10 random bags per test scan, their probabilities averaged (the paper uses one; the
issue allows averaging, reported here), and full-slice lobe segmentation scored against the phantoms' lobe maps,
with the weights of the last epoch. Measured runs, other cohorts and the settings that did not reach the target are
in the bundle README ("Performance"); another cohort is one environment variable away:

    M2U_SEED=11 .venv/bin/python -m pytest -s tests/bundles/test_m2unet_learning.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from chestct.phantoms import generate_cohort

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "m2unet_covid_severity"

# Cohort: sections instead of folds, so that the test split is large enough for an AUC.
NUM_TRAIN, NUM_VAL, NUM_TEST = (int(v) for v in os.environ.get("M2U_SPLITS", "384,8,192").split(","))
SHAPE = tuple(int(v) for v in os.environ.get("M2U_SHAPE", "64,64,24").split(","))
SEED = int(os.environ.get("M2U_SEED", 7))
BATCH_SIZE = int(os.environ.get("M2U_BATCH", 8))
# about M2U_STEPS optimiser steps, rounded up to whole epochs
EPOCHS = max(1, -(-int(os.environ.get("M2U_STEPS", 1500)) * BATCH_SIZE // NUM_TRAIN))
# smooth-maximum temperature of both GCP layers, or "embedding,image"
TEMPERATURES = [float(v) for v in os.environ.get("M2U_GCP_TEMPERATURE", "5.0").split(",")]
TARGET_AUC = 0.90
TARGET_LOBE_DICE = 0.80
TIME_LIMIT_S = 600.0

LEARNING = {
    "num_patches": int(os.environ.get("M2U_NUM_PATCHES", 6)),
    "patch_size": int(os.environ.get("M2U_PATCH", 64)),
    "features": int(os.environ.get("M2U_FEATURES", 16)),
    "bottleneck_features": int(os.environ.get("M2U_BOTTLENECK", 128)),
    "emb_concepts": 32,
    "img_concepts": 16,
    "gcp_pooling": os.environ.get("M2U_GCP_POOLING", "lse"),
    "lam": float(os.environ.get("M2U_LAM", 5.0)),
    "learning_rate": float(os.environ.get("M2U_LR", 0.002)),
    "head_lr_factor": float(os.environ.get("M2U_HEAD_LR_FACTOR", 0.2)),
    "concept_lr_factor": float(os.environ.get("M2U_CONCEPT_LR_FACTOR", 1.0)),
    "mil_activation": os.environ.get("M2U_MIL_ACTIVATION", "relu"),
    "mil_norm": os.environ.get("M2U_MIL_NORM", "layer"),
    "dropout": float(os.environ.get("M2U_DROPOUT", 0.5)),
    "augment_prob": float(os.environ.get("M2U_AUGMENT", 0.0)),
    "batch_size": BATCH_SIZE,
    # the decoder on 3 of the 6 patches of each bag (0: all of them)
    "seg_patches_per_bag": int(os.environ.get("M2U_SEG_PATCHES", 3)) or None,
    "max_epochs": EPOCHS,
    "val_interval": EPOCHS,  # one validation, at the end (the test split decides)
    "eval_num_draws": int(os.environ.get("M2U_EVAL_DRAWS", 10)),
    "num_workers": 0,
    "progress_bar": False,
    "eval_chunk_size": 64,
    "gcp_temperature": TEMPERATURES[0] if len(TEMPERATURES) == 1 else TEMPERATURES,
    "seed": int(os.environ.get("M2U_TRAIN_SEED", 0)),  # weights, bag draws and shuffling (the cohort has SEED)
}
if os.environ.get("M2U_OPTIMIZER", "adam") == "adam":
    LEARNING["optimizer"] = {
        "_target_": "torch.optim.Adam",
        "params": "$chestct.multitask_engine.parameter_groups("
                  "@network, @learning_rate, @head_lr_factor, @concept_lr_factor)",
        "lr": "@learning_rate",
        "weight_decay": "@weight_decay",
    }

pytestmark = pytest.mark.slow


def _cohort(root: Path) -> Path:
    """Generate the phantoms and rewrite the datalist into training / validation / test sections."""
    total = NUM_TRAIN + NUM_VAL + NUM_TEST
    path = generate_cohort(root, total, task="severity", shape=SHAPE, seed=SEED, num_folds=1, severe_fraction=0.5,
                           progress=False)
    content = json.loads(path.read_text())
    cases = [{k: v for k, v in e.items() if k in ("image", "label", "lobes")} for e in content["training"]]
    # the generator shuffles labels; keep both classes in every section
    severe = [c for c in cases if c["label"] == 1]
    mild = [c for c in cases if c["label"] == 0]
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    for name, size in (("test", NUM_TEST), ("validation", NUM_VAL), ("training", NUM_TRAIN)):
        half = size // 2
        sections[name] = severe[:half] + mild[: size - half]
        severe, mild = severe[half:], mild[size - half:]
    content.update(sections)
    path.write_text(json.dumps(content, indent=1))
    return path.parent


def _workflow(config_files: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in config_files],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_m2unet_learns_severity_and_lobes(tmp_path: Path) -> None:
    start = time.perf_counter()
    dataset = _cohort(tmp_path / "cohort")
    common = dict(bundle_root=str(BUNDLE), dataset_dir=str(dataset), ckpt_dir=str(tmp_path / "models"),
                  fold=None, **LEARNING)
    _workflow(["train.yaml"], run_id="training", output_dir=str(tmp_path / "train"), **common)
    trained = time.perf_counter()
    # the end of the schedule is evaluated (a 4-scan validation set picks a "best" epoch by chance)
    _workflow(["train.yaml", "evaluate.yaml"], run_id="evaluating", output_dir=str(tmp_path / "eval"),
              ckpt_path=str(tmp_path / "models" / "model_final.pt"), **common)
    elapsed = time.perf_counter() - start
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    summary = (f"test AUC {metrics.get('auc')}, accuracy {metrics.get('accuracy')}, F1 {metrics.get('f1')}, "
               f"mean lobe Dice {metrics.get('lobe_mean_dsc')}, per lobe "
               f"{ {k: round(v, 3) for k, v in metrics.items() if k.endswith('_dsc')} }, "
               f"train {trained - start:.0f} s, total {elapsed:.0f} s")
    print(summary)
    (Path(os.environ.get("M2U_LEARNING_REPORT", tmp_path / "report.txt"))).write_text(summary + "\n")
    assert metrics["auc"] >= TARGET_AUC, summary
    assert metrics["lobe_mean_dsc"] >= TARGET_LOBE_DICE, summary
    assert elapsed < TIME_LIMIT_S, summary
