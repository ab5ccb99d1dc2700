"""Benchmark: whole-scan DA-CMIL inference (load, preprocess, all-slice bag, network with attention outputs) and one
training step on a bag of k slices, with the full ResNet-34 at 256 px (untrained weights: speed does not depend on
them). Prints seconds per stage, slices per second and peak memory, and writes JSON.

    python benchmarks/dacmil_inference.py                    # covid_ct_md/normal001 from the real data folder
    python benchmarks/dacmil_inference.py SCAN --threads 2 --out outputs/benchmarks

Target (issue 3) on a 2-core CPU: under 30 s per scan, peak memory under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

TARGET_SCAN_S = 30.0
TARGET_PEAK_MB = 4096.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from chestct.bags import RecordGeometryd, SliceBagd
    from chestct.paths import real_data_dir
    from chestct.transforms import BodyCropd, CropToLungsd, HUWindowd, LoadCTd, LungMaskd
    from custom_nets.dacmil import DACMIL
    from custom_nets.losses.contrastive import DACMILLoss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scan", nargs="?", default=None, help="scan path (default: covid_ct_md/normal001)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32, help="instances through the backbone at once")
    parser.add_argument("--bag_size", type=int, default=32, help="k of the training step")
    parser.add_argument("--train_steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for dacmil_inference.json")
    args = parser.parse_args()
    scan = Path(args.scan) if args.scan else real_data_dir() / "covid_ct_md" / "normal001"
    if not scan.exists():
        print(f"scan not found: {scan} (give a scan path, or set CHESTCT_REAL_DATA)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    network = DACMIL(backbone=args.backbone, pooling="dual", instance_chunk_size=args.chunk).eval()
    seconds: dict[str, float] = {}
    total_start = time.perf_counter()
    data: dict = {"image": str(scan)}
    for name, transform in (
        ("load", LoadCTd("image")),
        ("record_geometry", RecordGeometryd("image")),
        ("body_crop", BodyCropd("image")),
        ("lung_mask", LungMaskd("image")),
        ("crop_to_lungs", CropToLungsd(["image", "lungs"])),
        ("window", HUWindowd("image")),
        ("slice_bag", SliceBagd("image", spatial_size=args.image_size)),
    ):
        tick = time.perf_counter()
        data = transform(data)
        seconds[name] = time.perf_counter() - tick
    bag = data["image"]
    tick = time.perf_counter()
    with torch.no_grad():
        out = network.forward_features(bag[None], torch.ones(1, bag.shape[0], dtype=torch.bool))
    seconds["network"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - total_start
    inference_peak = _peak_mb()
    num_slices = int(bag.shape[0])

    # One training step on a bag of k slices (forward_features, DA-CMIL loss, backward, Adam), batch of one bag.
    network.train()
    optimizer = torch.optim.Adam(network.param_groups())
    loss_fn = DACMILLoss()
    k_bag = torch.rand(1, args.bag_size, 1, args.image_size, args.image_size)
    step_times = []
    for step in range(args.train_steps + 1):
        tick = time.perf_counter()
        optimizer.zero_grad()
        o = network.forward_features(k_bag)
        loss = loss_fn(o["logits"], torch.ones(1, dtype=torch.long), o["instance_features"], o["bag_features"])
        loss.backward()
        optimizer.step()
        if step > 0:  # the first step allocates
            step_times.append(time.perf_counter() - tick)
    result = {
        "scan": str(scan),
        "input_shape": data["geometry"]["input_shape"],
        "cropped_shape": data["geometry"]["crop_shape"],
        "num_slices_in_bag": num_slices,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "threads": args.threads,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "slices_per_second": round(num_slices / seconds["network"], 2),
        "inference_peak_rss_mb": round(inference_peak, 1),
        "train_step_seconds_k": {"k": args.bag_size, "median": round(sorted(step_times)[len(step_times) // 2], 3),
                                 "all": [round(t, 3) for t in step_times]},
        "peak_rss_mb_with_training": round(_peak_mb(), 1),
        "top_slice": int(data["slice_indices"][int(out["instance_weights"][0].argmax())]),
        "targets": {"scan_s": TARGET_SCAN_S, "peak_mb": TARGET_PEAK_MB},
        "meets_targets": seconds["total"] < TARGET_SCAN_S and inference_peak < TARGET_PEAK_MB,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    print(f"{'stage':<18}{'seconds':>10}")
    for name, value in seconds.items():
        print(f"{name:<18}{value:>10.2f}")
    print(f"slices in bag {num_slices}, {result['slices_per_second']} slices/s, inference peak "
          f"{inference_peak:.0f} MB; training step (k={args.bag_size}) {result['train_step_seconds_k']['median']} s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dacmil_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
