"""``make demo``: a synthetic cohort, preprocessing QC of a synthetic and a real scan, then the DA-CMIL bundle.

    python -m chestct.demo --out outputs/demo            # everything (several minutes on a CPU)
    python -m chestct.demo --out outputs/demo --no-training

Writes ``cohort/`` (phantoms and datalist), ``qc/<scan>/`` (NIfTI masks, ``montage.png``, ``summary.json``),
``dacmil/`` (a small DA-CMIL model trained, evaluated and run with attention overlays, see
:mod:`chestct.demo_dacmil`) and ``demo_summary.json`` with what was done and how long it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chestct.paths import real_data_dir
from chestct.phantoms import generate_cohort
from chestct.preprocess import run_quality_control, scan_name
from chestct.writers import write_json

__all__ = ["run_demo"]

REAL_SCAN = Path("covid_ct_md") / "normal001"


def run_demo(out_dir: str | Path, num_cases: int = 8, shape: tuple[int, int, int] = (192, 192, 64),
             training: bool = True) -> dict:
    """Generate a small screening cohort, preprocess one phantom and the real sample scan (when present), then
    train, evaluate and run the DA-CMIL screening bundle on a second small cohort (``training=True``).

    Returns:
        the demo summary (also written to ``out_dir/demo_summary.json``).
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    steps = 3 if training else 2
    print(f"[1/{steps}] writing {num_cases} synthetic screening scans {shape} to {out_dir / 'cohort'}")
    datalist_path = generate_cohort(out_dir / "cohort", num_cases, task="screening", shape=shape, seed=0)
    datalist = json.loads(datalist_path.read_text())
    scans = [datalist_path.parent / datalist["training"][0]["image"]]
    real_scan = real_data_dir() / REAL_SCAN
    if real_scan.exists():
        scans.append(real_scan)
    else:
        print(f"      real sample not found at {real_scan}: preprocessing the phantom only")
    print(f"[2/{steps}] preprocessing {len(scans)} scan(s): load, body crop, lung mask -> {out_dir / 'qc'}")
    summaries = run_quality_control(scans, out_dir / "qc")
    summary = {
        "cohort": {"datalist": str(datalist_path), "num_cases": num_cases, "shape": list(shape)},
        "preprocessing": summaries,
        "montages": [str(out_dir / "qc" / scan_name(s["scan"]) / "montage.png")
                     for s in summaries if s["status"] == "ok"],
    }
    for item in summaries:
        state = "ok" if item["status"] == "ok" else f"FAILED: {item['reason']}"
        print(f"      {item['scan']}: {state}")
    if training:
        from chestct.demo_dacmil import run_dacmil_demo

        print(f"[3/3] DA-CMIL screening bundle: train a small model, evaluate, infer -> {out_dir / 'dacmil'}")
        dacmil = run_dacmil_demo(out_dir / "dacmil")
        summary["dacmil"] = dacmil
        print(f"      test metrics: {json.dumps(dacmil.get('metrics', {}), default=str)[:300]}")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(summary, out_dir / "demo_summary.json")
    print(f"done in {summary['seconds']} s; look at the montages in {out_dir / 'qc'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--num-cases", type=int, default=8, help="synthetic scans to generate")
    parser.add_argument("--no-training", action="store_true", help="skip the DA-CMIL training step")
    args = parser.parse_args(argv)
    summary = run_demo(args.out, num_cases=args.num_cases, training=not args.no_training)
    return 0 if all(s["status"] == "ok" for s in summary["preprocessing"]) else 1


if __name__ == "__main__":
    sys.exit(main())
