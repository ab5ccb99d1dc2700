"""The ``chestct`` command: synthetic cohorts and preprocessing quality control.

Examples::

    chestct phantoms --out data/screening --num-cases 40 --task screening
    chestct preprocess scan_folder/ other.nii.gz --out qc/
    chestct crossval --bundle_root bundles/m2unet_covid_severity --config_file configs/train.yaml \
        --config_file configs/evaluate.yaml --datalist data/severity/datalist.json --folds 5 --output_dir cv/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected a shape like 160x160x64, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chestct", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    phantoms = commands.add_parser("phantoms", help="write a synthetic chest CT cohort with ground truth")
    phantoms.add_argument("--out", required=True, help="output folder (datalist.json, images/, labels/)")
    phantoms.add_argument("--num-cases", type=int, default=20, help="number of scans")
    phantoms.add_argument("--task", choices=("screening", "severity"), default="screening",
                          help="screening: COVID-like (1) vs bacterial-like (0); severity: severe (1) vs not (0)")
    phantoms.add_argument("--shape", type=_shape, default=(160, 160, 64), help="volume size X x Y x Z")
    phantoms.add_argument("--format", choices=("nifti", "dicom"), default="nifti", help="image file format")
    phantoms.add_argument("--seed", type=int, default=0, help="random seed (the cohort is deterministic)")
    phantoms.add_argument("--folds", type=int, default=5, help="number of stratified folds")
    phantoms.add_argument("--severe-fraction", type=float, default=0.2, help="share of severe cases (severity task)")
    phantoms.add_argument("--effusion-probability", type=float, default=0.0, help="share of scans with an effusion")

    preprocess = commands.add_parser("preprocess", help="load, body-crop and lung-mask scans; write QC outputs")
    preprocess.add_argument("scans", nargs="+", help="DICOM series folders, DICOM files, NIfTI, NRRD or MHA files")
    preprocess.add_argument("--out", required=True, help="output folder (one subfolder per scan)")
    preprocess.add_argument("--lung-method", choices=("classical", "model"), default="classical",
                            help="lung mask method: classical threshold, or the exported lung segmenter")
    preprocess.add_argument("--model-path", default=None,
                            help="TorchScript lung segmenter for --lung-method model (default: the bundle's model)")
    preprocess.add_argument("--device", default=None, help="device for the model (default: cuda if available)")
    for sub in (phantoms, preprocess):
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("crossval", add_help=False,
                        help="k-fold training and evaluation of a bundle (see: chestct crossval --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (non-zero when a scan failed or an argument is wrong)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["crossval"]:  # its own parser, shared with `python -m chestct.crossval`
        from chestct.crossval import main as crossval_main

        return crossval_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "phantoms":
        from chestct.phantoms import generate_cohort

        try:
            datalist = generate_cohort(
                args.out, args.num_cases, task=args.task, shape=args.shape, seed=args.seed,
                image_format=args.format, num_folds=args.folds, severe_fraction=args.severe_fraction,
                effusion_probability=args.effusion_probability, progress=not args.quiet,
            )
        except ValueError as error:
            print(f"chestct phantoms: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.num_cases} {args.task} phantoms; datalist: {datalist}")
        return 0

    from chestct.errors import ChestCTInputError
    from chestct.preprocess import run_quality_control

    options = {"model_path": args.model_path, "device": args.device} if args.lung_method == "model" else {}
    try:
        summaries = run_quality_control(args.scans, args.out, lung_method=args.lung_method, progress=not args.quiet,
                                        lung_method_options=options)
    except ChestCTInputError as error:
        print(f"chestct preprocess: {error}", file=sys.stderr)
        return 2
    failed = [s for s in summaries if s["status"] != "ok"]
    for summary in summaries:
        if summary["status"] == "ok":
            volumes = summary["lung_volume_ml"]
            print(f"ok      {summary['scan']}: lungs R {volumes['right']:.0f} mL, L {volumes['left']:.0f} mL, "
                  f"{summary['timings_s']['total']:.1f} s")
        else:
            print(f"FAILED  {summary['scan']}: {summary['reason']}")
    print(f"{len(summaries) - len(failed)} of {len(summaries)} scans preprocessed; outputs in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
