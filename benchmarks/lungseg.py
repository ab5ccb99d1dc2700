"""Benchmark: the learned lung mask (``ModelLungMask``, the lung_ct_segmentation bundle's TorchScript model) on one
chest CT on the CPU, against a plain U-Net with the lungmask project's R231 architecture as the peer.

Timed stages: loading the scan (``chestct.io.load_ct``) and the model, reported separately; the segmentation of every
axial slice (window, resize to 256, batched forward pass, resize back, argmax) plus the post-processing (largest 3D
component per lung, in-plane hole filling). Peak memory is the process's peak resident set size.

The peer is the R231 architecture of the lungmask project (Hofmanninger et al. 2020), written here from its
description: a plain 2D U-Net of depth 5 with 64 base channels (64-128-256-512-1024), padded 3x3 convolutions each
followed by ReLU and batch norm, bilinear upsampling followed by a 1x1 convolution, 3 classes, on 256x256 slices. Its
weights cannot be downloaded here, so it runs with random weights (the cost does not depend on them) on the same
slices at the same thread count; because it is slow, ``--peer-slices`` slices are timed and the per-slice time is
compared (network forward passes only, for both models).

    python benchmarks/lungseg.py                          # covid_ct_md/normal001 from the real data folder
    python benchmarks/lungseg.py SCAN --threads 2 --out outputs/benchmarks --peer-slices 16

Target (issue 4): under 10 s for the 154 slices of normal001 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

TARGET_TOTAL_S = 10.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _default_scan() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chestct.paths import real_data_dir

    return real_data_dir() / "covid_ct_md" / "normal001"


def r231_unet(in_channels: int = 1, num_classes: int = 3, depth: int = 5, wf: int = 6):
    """A plain U-Net with the lungmask R231 layout (depth 5, 2**wf base channels, padding, batch norm, bilinear up)."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout),
        )

    class Up(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(cin, cout, 1))
            self.conv = block(2 * cout, cout)

        def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.cat([self.up(x), skip], dim=1))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [2 ** (wf + i) for i in range(depth)]
            self.down = nn.ModuleList([block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)])
            self.up = nn.ModuleList([Up(widths[i + 1], widths[i]) for i in reversed(range(depth - 1))])
            self.head = nn.Conv2d(widths[0], num_classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, down in enumerate(self.down):
                x = down(x)
                if i < len(self.down) - 1:
                    skips.append(x)
                    x = nn.functional.max_pool2d(x, 2)
            for up in self.up:
                x = up(x, skips.pop())
            return self.head(x)

    return UNet()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scan", nargs="?", default=None, help="CT scan (default: covid_ct_md/normal001)")
    parser.add_argument("--model", default=None, help="TorchScript model (default: the bundle's models/model.ts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--peer-slices", type=int, default=16, help="slices timed for the R231 peer (0: skip it)")
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for lungseg.json")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chestct.io import load_ct
    from chestct.lungseg_model import LUNGSEG_HU_WINDOW, LUNGSEG_IMAGE_SIZE, ModelLungMask

    scan = Path(args.scan) if args.scan else _default_scan()
    start = time.perf_counter()
    image = load_ct(scan)
    load_s = time.perf_counter() - start
    hu, spacing = image[0].numpy(), image.meta["spacing"]
    start = time.perf_counter()
    segmenter = ModelLungMask(args.model, device="cpu", batch_size=args.batch_size)
    model_load_s = time.perf_counter() - start
    segmenter(hu[:, :, :2].copy(), spacing)  # warm-up (TorchScript profiling runs)

    start = time.perf_counter()
    segmenter.postprocess = False
    raw = segmenter(hu, spacing)
    slices_s = time.perf_counter() - start
    start = time.perf_counter()
    labels = segmenter._postprocess(raw)
    post_s = time.perf_counter() - start
    segment_s = slices_s + post_s
    num_slices = hu.shape[2]

    # network-only time per slice of both models on the same preprocessed slices
    low, high = LUNGSEG_HU_WINDOW
    n_peer = min(args.peer_slices, num_slices) if args.peer_slices > 0 else 0
    pick = np.linspace(0, num_slices - 1, max(n_peer, 1)).round().astype(int)
    batch = torch.from_numpy(np.ascontiguousarray(hu[:, :, pick], dtype=np.float32)).permute(2, 0, 1)[:, None]
    batch = F.interpolate((batch.clamp(low, high) - low) / (high - low), size=(LUNGSEG_IMAGE_SIZE,) * 2,
                          mode="bilinear", align_corners=False)
    with torch.inference_mode():
        start = time.perf_counter()
        for chunk in batch.split(args.batch_size):
            segmenter.model(chunk)
        ours_per_slice = (time.perf_counter() - start) / len(batch)
    result = {
        "scan": str(scan), "num_slices": int(num_slices), "shape": list(hu.shape), "threads": args.threads,
        "batch_size": args.batch_size, "load_scan_s": load_s, "load_model_s": model_load_s,
        "segment_slices_s": slices_s, "postprocess_s": post_s, "segment_total_s": segment_s,
        "slices_per_s": num_slices / segment_s, "peak_rss_mb": _peak_rss_mb(),
        "right_voxels": int((labels == 1).sum()), "left_voxels": int((labels == 2).sum()),
        "ours_network_ms_per_slice": 1000 * ours_per_slice, "target_s": TARGET_TOTAL_S,
        "meets_target": segment_s < TARGET_TOTAL_S, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if n_peer:
        peer = r231_unet().eval()
        with torch.inference_mode():
            peer(batch[:2])  # warm-up
            start = time.perf_counter()
            for chunk in batch.split(args.batch_size):
                peer(chunk)
            peer_per_slice = (time.perf_counter() - start) / len(batch)
        result.update({
            "peer": "R231-architecture U-Net (depth 5, 64 base channels, random weights)",
            "peer_slices_timed": int(len(batch)), "peer_network_ms_per_slice": 1000 * peer_per_slice,
            "peer_estimated_total_s": peer_per_slice * num_slices,
            "peer_over_ours_ratio": peer_per_slice / ours_per_slice,
        })
    rows = [("load scan (s)", load_s), ("load model (s)", model_load_s), ("segment slices (s)", slices_s),
            ("post-process (s)", post_s), ("segment total (s)", segment_s), ("slices / s", num_slices / segment_s),
            ("peak RSS (MB)", result["peak_rss_mb"]), ("ours network (ms / slice)", 1000 * ours_per_slice)]
    if n_peer:
        rows += [("R231 peer network (ms / slice)", result["peer_network_ms_per_slice"]),
                 ("R231 peer est. total (s)", result["peer_estimated_total_s"]),
                 ("peer / ours ratio", result["peer_over_ours_ratio"])]
    print(f"lung segmentation of {scan.name}: {num_slices} slices {hu.shape[0]}x{hu.shape[1]}, "
          f"{args.threads} threads (target < {TARGET_TOTAL_S:.0f} s)")
    for name, value in rows:
        print(f"  {name:34s} {value:10.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lungseg.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
