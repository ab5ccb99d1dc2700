"""Lobe segmentation of a phantom-trained M2UNet on the real two-slice CIP lobe map (issue 5).

``cip/crop_ct_2slices.nrrd`` holds two real chest CT slices (443 x 349 pixels of 0.586 mm) and
``cip/derived_crop_ct_2slices_lobes.nrrd`` their five-lobe labels (CIP codes 4-8 = right upper, middle, lower, left
upper, lower). The model under test was trained on phantoms only, whose pixels are some 6.7 mm wide, so each slice is
scored twice:

- ``matched``: the windowed slice is resampled in-plane to the training pixel size (``--train-spacing-mm``, default:
  the phantoms' spacing), segmented with the bundle's full-slice sliding window, and the labels resampled back
  (nearest) to the 0.586 mm grid;
- ``native``: segmented at 0.586 mm, as the bundle's inference would do (no resampling: lobes 11 times larger than
  anything seen in training).

Prints per-lobe DSC / sensitivity / PPV (the paper's Table III), writes JSON and a PNG (CT, truth, both predictions).

    python benchmarks/m2unet_real_lobes.py --ckpt MODEL.pt --network '{"features": 16, ...}' --patch-size 48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CIP_LOBE_OFFSET = 3  # CIP lobe codes 4..8 are this project's lobe labels 1..5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="M2UNet checkpoint (a state dict or a bundle checkpoint)")
    parser.add_argument("--network", default="{}", help="JSON keyword arguments of custom_nets.M2UNet")
    parser.add_argument("--patch-size", type=int, default=128, help="sliding-window size = training patch size")
    parser.add_argument("--train-spacing-mm", type=float, default=None,
                        help="in-plane pixel size of the training scans (default: read from --train-image)")
    parser.add_argument("--train-image", default=None, help="one training scan, to read its in-plane spacing")
    parser.add_argument("--ct", default=None, help="default: cip/crop_ct_2slices.nrrd of the real data folder")
    parser.add_argument("--lobes", default=None, help="default: cip/derived_crop_ct_2slices_lobes.nrrd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/benchmarks")
    return parser.parse_args(argv)


def _resize(slices: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    import torch.nn.functional as F

    if mode == "nearest":
        return F.interpolate(slices.float(), size=size, mode="nearest")
    return F.interpolate(slices, size=size, mode=mode, align_corners=False)


def segment(net, image: np.ndarray, spacing: float, target_spacing: float | None, patch_size: int) -> np.ndarray:
    """Lobe labels (X, Y, Z) of a windowed image (X, Y, Z), optionally resampled in-plane to ``target_spacing``."""
    import torch

    from chestct.patch_bags import segment_volume_slices

    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    shape = tuple(volume.shape[:2])
    if target_spacing:
        size = tuple(max(1, round(s * spacing / target_spacing)) for s in shape)
        slices = _resize(volume.permute(2, 0, 1)[:, None], size, "bilinear")  # (Z, 1, x, y)
        volume = slices[:, 0].permute(1, 2, 0)
    labels = segment_volume_slices(volume[None], net.segment, roi_size=patch_size)
    if target_spacing:
        labels = _resize(labels.permute(2, 0, 1)[:, None], shape, "nearest")[:, 0].permute(1, 2, 0)
    return labels.to(torch.uint8).numpy()


def _figure(image: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray], scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from chestct.constants import LOBE_NAMES
    from chestct.multitask_engine import LOBE_COLOURS

    cmap = ListedColormap(LOBE_COLOURS)
    columns = [("CT (window -1200..0 HU)", None), ("truth (CIP lobe map)", truth)] + [
        (f"{name}: mean DSC {scores[name]['mean_dsc']:.3f}", labels) for name, labels in predictions.items()
    ]
    depth = image.shape[2]
    figure, axes = plt.subplots(depth, len(columns), figsize=(3.0 * len(columns), 2.6 * depth), squeeze=False)
    for z in range(depth):
        for ax, (title, labels) in zip(axes[z], columns):
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if labels is not None:
                lab = labels[:, :, z].T.astype(float)
                ax.imshow(np.ma.masked_where(lab == 0, lab), cmap=cmap, vmin=0.5, vmax=5.5, alpha=0.45,
                          interpolation="nearest")
            ax.set_title(title if z == 0 else "", fontsize=8)
            ax.axis("off")
    legend = ", ".join(f"{v} {n}" for v, n in LOBE_NAMES.items())
    figure.suptitle(f"M2UNet trained on phantoms, two real CT slices (CIP) - lobes: {legend}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=70)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from chestct.io import load_ct
    from chestct.paths import real_data_dir
    from chestct.severity_metrics import lobe_overlap
    from chestct.transforms import HUWindowd
    from custom_nets import M2UNet

    torch.set_num_threads(args.threads)
    cip = real_data_dir() / "cip"
    ct = load_ct(args.ct or cip / "crop_ct_2slices.nrrd")
    truth = load_ct(args.lobes or cip / "derived_crop_ct_2slices_lobes.nrrd", check_hu=False)[0].numpy().round()
    truth = np.where(truth > 0, truth - CIP_LOBE_OFFSET, 0).astype(np.uint8)
    image = HUWindowd(keys="image")({"image": ct})["image"][0].numpy()
    spacing = float(ct.meta["spacing"][0])
    train_spacing = args.train_spacing_mm
    if train_spacing is None and args.train_image:
        train_spacing = float(load_ct(args.train_image).meta["spacing"][0])

    net = M2UNet(**json.loads(args.network))
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    net.eval()

    predictions, scores, seconds = {}, {}, {}
    for name, target in (("matched", train_spacing), ("native", None)):
        if name == "matched" and not target:
            continue
        start = time.perf_counter()
        with torch.no_grad():
            predictions[name] = segment(net, image, spacing, target, args.patch_size)
        seconds[name] = time.perf_counter() - start
        scores[name] = lobe_overlap(predictions[name], truth)

    out = Path(args.out)
    _figure(image, truth, predictions, scores, out / "m2unet_real_lobes.png")
    report = {
        "ct": str(args.ct or cip / "crop_ct_2slices.nrrd"),
        "ckpt": str(args.ckpt),
        "network": json.loads(args.network),
        "patch_size": args.patch_size,
        "spacing_mm": spacing,
        "train_spacing_mm": train_spacing,
        "scores": scores,
        "seconds": seconds,
        "figure": str(out / "m2unet_real_lobes.png"),
    }
    (out / "m2unet_real_lobes.json").write_text(json.dumps(report, indent=2))
    print("| grid | " + " | ".join(f"{lobe} DSC" for lobe in ("RUL", "RML", "RLL", "LUL", "LLL")) + " | mean DSC | "
          "mean sensitivity | mean PPV |")
    print("|---" * 9 + "|")
    from chestct.constants import LOBE_NAMES

    for name, s in scores.items():
        lobes = " | ".join(f"{s[f'{n}_dsc']:.3f}" for n in LOBE_NAMES.values())
        print(f"| {name} | {lobes} | {s['mean_dsc']:.3f} | {s['mean_sensitivity']:.3f} | {s['mean_ppv']:.3f} |")
    return report


if __name__ == "__main__":
    main()
