"""DA-CMIL comparison on a synthetic screening cohort, like the paper's Table 1: the dual attention with and without
the contrastive loss, the attention / max / mean MIL baselines, and the bag size k of the dual model.

Every variant is trained and evaluated through the bundle's own configs (``ConfigWorkflow`` on configs/train.yaml,
then train.yaml + evaluate.yaml) on the same phantom cohort and folds; the test metrics are the paper's columns
(accuracy, AUC, F1, specificity, sensitivity). Each finished variant is written to ``OUT/VARIANT.json`` and skipped
when the script runs again, so two processes with disjoint ``--variants`` can share the CPU and either prints the
whole table (``OUT/table.md`` and ``OUT/results.json``) at the end.

    python benchmarks/dacmil_comparison.py --out outputs/dacmil_comparison            # every variant
    python benchmarks/dacmil_comparison.py --variants dual dual_ce_only --threads 1   # some of them

Each variant takes about 15-20 minutes on one core of a 2-core CPU at the default sizes.

Synthetic phantoms only: the numbers say how the variants compare on this cohort, not how they do on patients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dacmil_covid_screening"

# A CPU-sized configuration (ResNet-10, 128 px, k = 16, batches of 4 bags, both learning rates 1e-3 because the
# backbone starts from scratch, x0.1 after epoch 10 of 16); the paper's is ResNet-34, 256 px, k = 32, 30 epochs.
BASE = {"backbone": "resnet10", "image_size": 128, "bag_size": 16, "batch_size": 4, "backbone_lr": 1e-3,
        "head_lr": 1e-3, "epochs": 16, "lr_milestones": [10], "num_workers": 0, "progress_bar": False,
        "val_folds": [0], "test_folds": [1], "seed": 0}
# name -> (table row, overrides of BASE)
VARIANTS: dict[str, tuple[str, dict]] = {
    "dual": ("DA-CMIL: dual attention + contrastive (lambda 0.5)", {"pooling": "dual", "lam": 0.5}),
    "dual_ce_only": ("dual attention without contrastive (lambda 1.0)", {"pooling": "dual", "lam": 1.0}),
    "attention": ("DeepAttentionMIL (attention pooling)", {"pooling": "attention", "lam": 1.0}),
    "max": ("ClassicMIL (max pooling)", {"pooling": "max", "lam": 1.0}),
    "mean": ("mean pooling", {"pooling": "mean", "lam": 1.0}),
    "dual_k8": ("DA-CMIL, k = 8", {"pooling": "dual", "lam": 0.5, "bag_size": 8}),
    "dual_k32": ("DA-CMIL, k = 32", {"pooling": "dual", "lam": 0.5, "bag_size": 32}),
}
COLUMNS = ("accuracy", "auc", "f1", "specificity", "sensitivity")


def run_variant(name: str, cohort: Path, out: Path, settings: dict) -> dict:
    """Train and evaluate one variant through the bundle; returns its test metrics and timing."""
    from monai.bundle import ConfigWorkflow

    work = out / "runs" / name
    paths = {"dataset_dir": str(cohort), "output_dir": str(work / "eval"), "ckpt_dir": str(work / "models"),
             "bundle_root": str(BUNDLE)}
    start = time.perf_counter()
    for configs, run_id in ((["train.yaml"], "training"), (["train.yaml", "evaluate.yaml"], "evaluating")):
        workflow = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in configs], run_id=run_id,
                                  logging_file=False, workflow_type=None, **paths, **settings)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    metrics = json.loads((work / "eval" / "evaluation" / "metrics.json").read_text())
    return {"variant": name, "row": VARIANTS[name][0], "settings": settings,
            "metrics": {k: metrics[k] for k in (*COLUMNS, "num_cases")}, "seconds": time.perf_counter() - start}


def table(results: list[dict]) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " | train + test s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in results:
        values = " | ".join(f"{r['metrics'][c]:.3f}" for c in COLUMNS)
        lines.append(f"| {r['row']} | {values} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/dacmil_comparison", help="results folder")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cases", type=int, default=120, help="phantoms in the cohort (4 folds)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 32), help="phantom size X Y Z")
    parser.add_argument("--seed", type=int, default=12, help="cohort seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override a base setting")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    from chestct.phantoms import generate_cohort

    torch.set_num_threads(args.threads)
    settings = dict(BASE)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    out = Path(args.out)
    cohort = out / f"cohort_{args.cases}_{args.seed}"
    if not (cohort / "datalist.json").is_file():
        generate_cohort(cohort, args.cases, task="screening", shape=tuple(args.shape), seed=args.seed, num_folds=4,
                        progress=False)
    for name in args.variants:
        path = out / f"{name}.json"
        if path.is_file():
            print(f"{name}: done before ({path})")
            continue
        result = run_variant(name, cohort, out, {**settings, **VARIANTS[name][1]})
        result.update({"cohort": {"cases": args.cases, "shape": list(args.shape), "seed": args.seed, "folds": 4},
                       "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count()})
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: test AUC {result['metrics']['auc']:.3f} ({result['seconds']:.0f} s)")
    results = [json.loads((out / f"{n}.json").read_text()) for n in VARIANTS if (out / f"{n}.json").is_file()]
    text = table(results)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
