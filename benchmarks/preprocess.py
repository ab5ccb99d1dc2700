"""Benchmark: load and preprocess one chest CT (load, body crop, lung mask), several runs, median seconds.

Each run is a fresh process so the peak memory is that run's own. Prints a table and writes JSON.

    python benchmarks/preprocess.py                      # covid_ct_md/normal001 from the real data folder
    python benchmarks/preprocess.py SCAN --runs 5 --out outputs/benchmarks

Target (issue 2): total under 5 s and peak memory under 2 GB on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

TARGET_TOTAL_S = 5.0
TARGET_PEAK_MB = 2048.0
STAGES = ("load", "body_crop", "lung_mask", "window", "total")

_ONE_RUN = """
import json, resource, sys, torch
torch.set_num_threads({threads})
from chestct.preprocess import peak_rss_mb, preprocess_scan
scan = preprocess_scan(sys.argv[1])
workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # DICOM decoding processes
print(json.dumps(dict(scan.timings_s, peak_rss_mb=peak_rss_mb(), decode_workers_peak_mb=workers_mb,
                      shape=list(scan.input_shape), lung_ml=scan.lung_volume_ml())))
"""


def _default_scan() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chestct.paths import real_data_dir

    return real_data_dir() / "covid_ct_md" / "normal001"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scan", nargs="?", default=None, help="scan path (default: covid_ct_md/normal001)")
    parser.add_argument("--runs", type=int, default=5, help="number of timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for preprocess.json")
    args = parser.parse_args()
    scan = Path(args.scan) if args.scan else _default_scan()
    if not scan.exists():
        print(f"scan not found: {scan} (give a scan path, or set CHESTCT_REAL_DATA)", file=sys.stderr)
        return 2

    runs = []
    for index in range(args.runs):
        result = subprocess.run([sys.executable, "-c", _ONE_RUN.format(threads=args.threads), str(scan)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"run {index + 1}/{args.runs}: total {runs[-1]['total']:.2f} s", file=sys.stderr)

    median = {key: statistics.median(run[key] for run in runs) for key in (*STAGES, "peak_rss_mb")}
    report = {
        "scan": str(scan),
        "shape": runs[0]["shape"],
        "lung_volume_ml": runs[0]["lung_ml"],
        "runs": runs,
        "median": median,
        "targets": {"total_s": TARGET_TOTAL_S, "peak_rss_mb": TARGET_PEAK_MB},
        "meets_targets": median["total"] < TARGET_TOTAL_S and median["peak_rss_mb"] < TARGET_PEAK_MB,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "python": platform.python_version()},
    }
    header = "| " + " | ".join(f"{s} s" for s in STAGES) + " | peak RSS MB |"
    print(f"\npreprocess {scan.name} {tuple(report['shape'])}, median of {args.runs} runs")
    print(header)
    print("|" + "---|" * (len(STAGES) + 1))
    print("| " + " | ".join(f"{median[s]:.2f}" for s in STAGES) + f" | {median['peak_rss_mb']:.0f} |")
    print(f"target: total < {TARGET_TOTAL_S} s, peak < {TARGET_PEAK_MB:.0f} MB -> "
          f"{'met' if report['meets_targets'] else 'MISSED'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'preprocess.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
