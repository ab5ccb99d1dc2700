"""A few-minute CPU demo of the DA-CMIL screening bundle: synthetic cohort, training, evaluation, inference.

Everything is written under ``out_dir``: ``cohort/`` (phantoms and datalist), ``models/`` (checkpoints),
``outputs/`` (TensorBoard, cache, validation and evaluation reports), ``outputs/inference/`` (per-scan JSON,
attention overlays and NIfTI maps, cohort CSV). It runs the bundle's own configs through ``monai.bundle``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from chestct.phantoms import generate_cohort

__all__ = ["DEMO_SETTINGS", "run_dacmil_demo"]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dacmil_covid_screening"
# A small configuration that learns the synthetic task in a few CPU minutes (the paper's is ResNet-34, 256 px, k=32).
DEMO_SETTINGS: dict[str, Any] = {
    "backbone": "resnet18",
    "pooling": "dual",
    "image_size": 128,
    "bag_size": 8,
    "batch_size": 8,
    "epochs": 8,
    "lr_milestones": [6],
    "num_workers": 0,
    "progress_bar": False,
    "val_folds": [0],
    "test_folds": [1],
    "seed": 0,
}


def _run(configs: list[str], run_id: str, bundle: Path, **overrides: Any) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / c) for c in configs],
        run_id=run_id,
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def run_dacmil_demo(
    out_dir: str | Path,
    num_cases: int = 48,
    shape: tuple[int, int, int] = (96, 96, 32),
    seed: int = 11,
    bundle_root: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Generate a screening cohort, train the bundle's small configuration, evaluate it and run inference.

    Args:
        out_dir: output folder (created).
        num_cases: phantoms in the cohort (4 folds: half train, a quarter validation, a quarter test).
        shape: (X, Y, Z) of each phantom.
        seed: cohort seed.
        bundle_root: the bundle folder (default: the repository's ``bundles/dacmil_covid_screening``).
        settings: overrides of :data:`DEMO_SETTINGS` (any key of ``train.yaml``).

    Returns:
        ``{"metrics": test metrics, "seconds": {...}, "paths": {...}}`` (also written to ``out_dir/demo.json``).
    """
    out = Path(out_dir).resolve()
    bundle = Path(bundle_root).resolve() if bundle_root is not None else BUNDLE
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    cohort = out / "cohort"
    generate_cohort(cohort, num_cases, task="screening", shape=shape, seed=seed, num_folds=4, progress=False)
    seconds["cohort"] = time.perf_counter() - tick

    paths = {"dataset_dir": str(cohort), "output_dir": str(out / "outputs"), "ckpt_dir": str(out / "models"),
             "bundle_root": str(bundle)}
    config = {**DEMO_SETTINGS, **settings, "resume": False}
    tick = time.perf_counter()
    _run(["train.yaml"], "training", bundle, **paths, **config)
    seconds["training"] = time.perf_counter() - tick
    tick = time.perf_counter()
    _run(["train.yaml", "evaluate.yaml"], "evaluating", bundle, **paths, **config)
    seconds["evaluation"] = time.perf_counter() - tick

    # Inference on the held-out test scans, as a folder of files would be given by a user.
    scans = out / "test_scans"
    scans.mkdir(exist_ok=True)
    datalist = json.loads((cohort / "datalist.json").read_text())
    for entry in datalist["training"]:
        if entry["fold"] in config["test_folds"]:
            link = scans / Path(entry["image"]).name
            if not link.exists():
                link.symlink_to(cohort / entry["image"])
    tick = time.perf_counter()
    _run(["train.yaml", "inference.yaml"], "inference", bundle, **{**paths, "dataset_dir": str(scans)}, **config)
    seconds["inference"] = time.perf_counter() - tick

    metrics = json.loads((out / "outputs" / "evaluation" / "metrics.json").read_text())
    result = {
        "metrics": metrics,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "settings": config,
        "cohort": {"num_cases": num_cases, "shape": list(shape), "seed": seed},
        "paths": {
            "model": str(out / "models" / "model.pt"),
            "evaluation": str(out / "outputs" / "evaluation"),
            "inference": str(out / "outputs" / "inference"),
            "tensorboard": str(out / "outputs" / "tensorboard"),
        },
        "intended_use": "research only, not for clinical use",
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # python -m chestct.demo_dacmil OUT_DIR
    import sys

    print(json.dumps(run_dacmil_demo(sys.argv[1] if len(sys.argv) > 1 else "outputs/dacmil_demo"), indent=2))
