"""Benchmark: M2UNet severity + full lobe segmentation of one chest CT on the CPU, seconds per stage, peak memory.

The stages are those of the bundle's inference (configs/inference.yaml): load in HU, body crop, lung window, severity
from ``--draws`` random bags of ``--num-patches`` patches (encoder + MIL, no decoder), full-slice lobe segmentation
(MONAI sliding window of ``--patch-size`` over every axial slice), writing the lobe NIfTI on the input grid and the
lobe volumes. The network has random weights (the cost does not depend on them) unless ``--weights`` is given. As
the bundle's step does by default, severity and lobes run on an inference copy of the network (batch norms folded
into the convolutions, channels-last memory format; ``custom_nets.inference.inference_copy``, built in the stage
``inference_copy``); ``--no-fast-inference`` runs the network itself, for comparison.
Optionally (``--train-step``) the time and memory of one training step on one bag (forward + backward of both
tasks and an SGD step), at ``--train-patches`` patches, the decoder on all of them or (``--train-seg-patches K``) on a
random ``K`` of them, as the bundle's ``seg_patches_per_bag`` does; the memory is the process peak and the bytes of
the tensors autograd saves for the backward pass (the activations, which set the GPU memory a bag needs).

    python benchmarks/m2unet_inference.py                       # covid_ct_md/normal001 from the real data folder
    python benchmarks/m2unet_inference.py SCAN --threads 2 --out outputs/benchmarks --train-step
    python benchmarks/m2unet_inference.py --no-fast-inference   # the unfused, default-memory-format network

Target (issue 5): severity + full lobe segmentation under 60 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

TARGET_TOTAL_S = 60.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _default_scan() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from chestct.paths import real_data_dir

    return real_data_dir() / "covid_ct_md" / "normal001"


def _network(args: argparse.Namespace):
    import torch

    from custom_nets import M2UNet

    # seeded random weights: the outputs of --fast-inference and --no-fast-inference runs can then be compared
    torch.manual_seed(0)
    net = M2UNet(features=args.features, decoder_features=args.decoder_features)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return net


def run_inference(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from chestct.multitask_engine import case_geometry, lung_box, segment_lobes
    from chestct.patch_bags import RandomPatchBagd, lobe_volumes_ml
    from chestct.transforms import BodyCropd, HUWindowd, LoadCTd
    from chestct.writers import save_nifti_like_input, uncrop
    from custom_nets import inference_copy

    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    net = _network(args).eval()
    stage_cpu = [time.process_time()]

    def lap(name: str, started: float) -> None:
        times[name] = time.perf_counter() - started
        now = time.process_time()
        cpu[name] = now - stage_cpu[0]
        stage_cpu[0] = now

    cpu_start = time.process_time()
    t0 = time.perf_counter()
    data = LoadCTd(keys="image")({"image": str(args.scan)})
    lap("load", t0)
    t = time.perf_counter()
    data = BodyCropd(keys="image", body_key="body")(data)
    lap("body_crop", t)
    t = time.perf_counter()
    data = HUWindowd(keys="image")(data)
    lap("window", t)

    t = time.perf_counter()
    bagger = RandomPatchBagd(keys="image", label_keys=(), num_patches=args.num_patches, patch_size=args.patch_size,
                             num_draws=args.draws)
    bagger.set_random_state(seed=0)
    bags = bagger({"image": data["image"], "body": data["body"]})
    bags = bags if isinstance(bags, list) else [bags]
    x = torch.stack([torch.as_tensor(b["image"]) for b in bags])
    lap("bag_draw", t)
    t = time.perf_counter()
    # as chestct.multitask_engine.M2UNetEvalStep(fast_inference=True), which builds it on the first scan of a run
    model = inference_copy(net) if args.fast_inference else net
    lap("inference_copy", t)
    t = time.perf_counter()
    with torch.no_grad():
        probs = torch.softmax(model.classify(x, None, args.chunk_size), dim=-1)
    probability = float(probs[:, 1].mean())
    lap("severity", t)

    t = time.perf_counter()
    image = data["image"]
    box = lung_box(image.as_tensor(), data["body"]) if args.crop_lungs else tuple(slice(0, s) for s in image.shape[1:])
    memory_format = torch.channels_last if args.fast_inference else torch.contiguous_format

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return model.segment(windows.contiguous(memory_format=memory_format))

    labels = segment_lobes(image.as_tensor(), predictor, body=data["body"], roi_size=args.patch_size,
                           sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                           slice_batch_size=args.slice_batch_size, crop_to_lungs=args.crop_lungs,
                           whole_slice=args.whole_slice, max_roi_size=args.max_roi_size)
    labels = labels * (torch.as_tensor(np.asarray(data["body"])).reshape(labels.shape) > 0).to(labels.dtype)
    lap("lobe_segmentation", t)

    t = time.perf_counter()
    geometry = case_geometry(image)
    volumes = lobe_volumes_ml(labels, spacing=np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0))
    start = np.asarray(geometry["crop_start"])
    full = uncrop(labels.numpy(), (start, start + np.asarray(labels.shape)), geometry["input_shape"])
    with tempfile.TemporaryDirectory() as folder:
        save_nifti_like_input(full, geometry["input_affine"], geometry["original_affine"],
                              Path(folder) / "lobes.nii.gz")
    lap("write", t)
    times["total"] = time.perf_counter() - t0
    cpu["total"] = time.process_time() - cpu_start

    seg_shape = [b.stop - b.start for b in box]
    roi = args.patch_size
    if args.whole_slice:
        roi = max(roi, min(-(-max(seg_shape[0], seg_shape[1]) // 16) * 16, args.max_roi_size))
    windows_per_slice = _windows(seg_shape[0], roi, args.overlap) * _windows(seg_shape[1], roi, args.overlap)
    return {
        "fast_inference": bool(args.fast_inference),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "input_shape": geometry["input_shape"],
        "crop_shape": geometry["crop_shape"],
        "segmented_box_shape": [int(v) for v in seg_shape],
        "window_size": int(roi),
        "windows": int(windows_per_slice * seg_shape[2]),
        "probability_severe": probability,
        "lobe_volumes_ml": {k: round(v, 1) for k, v in volumes.items()},
    }


def _windows(size: int, roi: int, overlap: float) -> int:
    import math

    if size <= roi:
        return 1
    step = max(1, int(roi * (1 - overlap)))
    return math.ceil((size - roi) / step) + 1


def run_train_step(args: argparse.Namespace) -> dict:
    import torch

    from custom_nets import M2UNetLoss

    torch.set_num_threads(args.threads)
    net = _network(args).train()
    loss_fn = M2UNetLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    n, p = args.train_patches, args.patch_size
    k = n if args.train_seg_patches is None else min(args.train_seg_patches, n)
    bag = torch.rand(1, n, 1, p, p)
    lobes = torch.randint(0, 6, (1, n, p, p))
    labels = torch.tensor([1])
    before = _peak_rss_mb()
    results = []
    cpu_times = []
    saved_bytes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # one entry per storage: views of one activation are saved more than once
        saved_bytes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    for _ in range(args.train_repeats):
        c = time.process_time()
        t = time.perf_counter()
        optimizer.zero_grad()
        seg_index = None if k == n else torch.randperm(n)[:k].sort().values
        saved_bytes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            class_logits, seg_logits = net(bag, None, True, seg_index)
            seg_lobes = lobes if seg_index is None else lobes[:, seg_index]
            loss = loss_fn(class_logits, labels, seg_logits, seg_lobes, regularization=net.regularization_loss())
        loss.backward()
        optimizer.step()
        results.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return {
        "patches": n,
        "segmented_patches": k,
        "patch_size": p,
        "saved_for_backward_mb": round(sum(saved_bytes.values()) / 2**20, 1),
        "seconds_per_step": [round(r, 2) for r in results],
        "cpu_seconds_per_step": [round(r, 2) for r in cpu_times],
        # the step is linear in the number of patches: scaled to the paper's bag of 200 (same share segmented)
        "seconds_per_step_200_patches_extrapolated": round(min(results) * 200 / n, 1),
        "saved_for_backward_mb_200_patches_extrapolated": round(sum(saved_bytes.values()) / 2**20 * 200 / n),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_before_mb": round(before, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scan", nargs="?", default=None, help="scan path (default: covid_ct_md/normal001)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--features", type=int, default=64, help="encoder width (the paper: 64)")
    parser.add_argument("--decoder-features", type=int, default=None, help="decoder width (default: features)")
    parser.add_argument("--weights", default=None, help="model.pt of a trained bundle (default: random weights)")
    parser.add_argument("--num-patches", type=int, default=200, help="patches per bag")
    parser.add_argument("--patch-size", type=int, default=128, help="patch and sliding-window size")
    parser.add_argument("--draws", type=int, default=1, help="random bags averaged for the severity")
    parser.add_argument("--chunk-size", type=int, default=50, help="patches per encoder call")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    parser.add_argument("--sw-batch-size", type=int, default=16, help="windows per network call")
    parser.add_argument("--slice-batch-size", type=int, default=16, help="axial slices per sliding-window call")
    # defaults follow the bundle's inference.yaml (lobe_crop_to_lungs: true); --no-... measures the plain tiling
    parser.add_argument("--crop-lungs", action=argparse.BooleanOptionalAction, default=True,
                        help="segment only the box of the aerated lungs (chestct.multitask_engine.lung_box)")
    parser.add_argument("--whole-slice", action=argparse.BooleanOptionalAction, default=True,
                        help="one window per (cropped) slice, padded to a multiple of 16, not patch-size windows")
    parser.add_argument("--max-roi-size", type=int, default=512, help="largest whole-slice window side")
    # default follows the bundle's configs (fast_inference: true); --no-fast-inference runs the network itself
    parser.add_argument("--fast-inference", action=argparse.BooleanOptionalAction, default=True,
                        help="run custom_nets.inference.inference_copy of the network (BN folded, channels-last)")
    parser.add_argument("--train-step", action="store_true", help="also time one training step on one bag")
    parser.add_argument("--train-patches", type=int, default=200,
                        help="patches of the training bag (200 needs about 17 GB of memory at 128 px, full width)")
    parser.add_argument("--train-seg-patches", type=int, default=None,
                        help="patches of the training bag that the decoder segments (default: all)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps")
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for m2unet_inference.json")
    args = parser.parse_args()
    args.scan = Path(args.scan) if args.scan else _default_scan()
    if not args.scan.exists():
        print(f"scan not found: {args.scan} (give a scan path, or set CHESTCT_REAL_DATA)", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    result = {
        "scan": str(args.scan),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads},
        "target_total_s": TARGET_TOTAL_S,
        "inference": run_inference(args),
    }
    result["inference"]["meets_target"] = result["inference"]["seconds"]["total"] < TARGET_TOTAL_S
    # other processes on the machine stretch the wall time: the load average and the CPU time tell by how much
    result["inference"]["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    if args.train_step:
        result["train_step"] = run_train_step(args)

    inference = result["inference"]
    print(f"M2UNet inference on {args.scan.name}: input {inference['input_shape']}, body crop "
          f"{inference['crop_shape']}, segmented box {inference['segmented_box_shape']}, {inference['windows']} "
          f"windows of {inference['window_size']} px, features {args.features}/"
          f"{args.decoder_features or args.features}, {args.threads} threads, fast inference "
          f"{'on' if args.fast_inference else 'off'}")
    print(f"{'stage':<20}{'wall s':>10}{'CPU s':>10}")
    for stage, seconds in inference["seconds"].items():
        print(f"{stage:<20}{seconds:>10.2f}{inference['cpu_seconds'][stage]:>10.2f}")
    print(f"load average (1 min) before/after: {inference['load_average_before_after']} on {os.cpu_count()} CPUs")
    print(f"{'peak memory (MB)':<20}{inference['peak_rss_mb']:>10.0f}")
    print(f"target total < {TARGET_TOTAL_S:.0f} s: {'met' if inference['meets_target'] else 'NOT met'}")
    if args.train_step:
        step = result["train_step"]
        print(f"training step, one bag of {step['patches']} x {step['patch_size']}^2 ({step['segmented_patches']} "
              f"segmented): {step['seconds_per_step']} s (CPU {step['cpu_seconds_per_step']} s), saved for backward "
              f"{step['saved_for_backward_mb']:.0f} MB, peak memory {step['peak_rss_mb']:.0f} MB; scaled to 200 "
              f"patches: {step['seconds_per_step_200_patches_extrapolated']} s, "
              f"{step['saved_for_backward_mb_200_patches_extrapolated'] / 1024:.1f} GB saved for backward")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "m2unet_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out / 'm2unet_inference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
