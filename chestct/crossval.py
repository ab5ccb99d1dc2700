"""k-fold cross-validation of any MONAI bundle: run training and evaluation per fold, aggregate mean +- std.

The papers report five-fold cross-validation as mean +- std over folds (M2UNet: per fold 70 % train, 10 %
validation, 20 % test). This module runs each fold as ``python -m monai.bundle run <run_id>`` in a subprocess and
summarises the metrics each fold's evaluation wrote.

Key contract with the bundle (the config must accept these keys as overrides):

- ``fold`` (int, the test fold ``k``), ``num_folds`` (int ``n``), ``datalist`` (path of a datalist whose cases
  carry a ``fold`` key; passed only when given) and ``output_dir`` (``<output_dir>/fold_<k>``: everything the fold
  writes goes there: checkpoints, logs, metrics). Names are configurable (``fold_key`` ... in
  :func:`run_cross_validation`).
- The config selects its cases with :func:`load_fold_split` (with
  ``imports: ["$import chestct", "$import chestct.crossval"]``: MONAI binds ``$import a.b`` to ``a.b`` only), e.g.
  ``train_cases: "$chestct.crossval.load_fold_split(@datalist, @fold, @num_folds)['training']"``:
  test = the cases of fold ``k``; validation = fold ``(k + 1) % n`` (``validation="next_fold"``, the default) or a
  label-stratified share of the remaining cases (``validation=0.125`` gives the paper's 70/10/20 with five folds);
  training = all other cases.
- Evaluation writes ``metrics.json`` (``metric_file``) in its ``output_dir``: a flat JSON object metric name ->
  number. Nested objects are flattened with ``"."`` (``{"dice": {"right_upper": 0.8}}`` -> ``dice.right_upper``);
  other values (strings, lists, null) are ignored.

The run writes ``<output_dir>/crossval.json`` (per-fold status, metrics and the summary) and
``<output_dir>/crossval.md`` (a table: metric | mean +- std | fold values), plus one log per fold and run id
(``fold_<k>/<run_id>.log``) and the arguments each run received (``fold_<k>/<run_id>_args.json``, a MONAI
``--args_file``). A failing fold is reported and the other folds go on; the command line exits with status 1 when a
fold failed.

Command line::

    python -m chestct.crossval --bundle_root bundles/m2unet_covid_severity \\
        --config_file configs/train.yaml --run_config_file evaluating=configs/evaluate.yaml \\
        --datalist data/datalist.json --folds 5 --output_dir runs/cv \\
        --override max_epochs=1

(``--config_file`` goes to every run id; ``--run_config_file RUN_ID=FILE`` to one run id only, after them.)
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chestct.errors import ChestCTInputError

__all__ = [
    "fold_split",
    "format_markdown",
    "load_fold_split",
    "main",
    "run_cross_validation",
    "summarize_folds",
]

logger = logging.getLogger(__name__)

DEFAULT_RUN_IDS: tuple[str, ...] = ("training", "evaluating")
DEFAULT_METRIC_FILE: str = "metrics.json"
VALIDATION_MODES: tuple[str, ...] = ("next_fold", "none")
# Datalist keys holding file paths, made absolute against the datalist's folder by load_fold_split.
DEFAULT_PATH_KEYS: tuple[str, ...] = ("image", "lobes", "lungs", "body", "lesions")


# ---------------------------------------------------------------------------------------------- splits


def _check_fold(fold: int, num_folds: int) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in [0, {num_folds}), got {fold!r}.")


def fold_split(
    cases: Sequence[Mapping[str, Any]],
    fold: int,
    num_folds: int,
    validation: str | float = "next_fold",
    fold_key: str = "fold",
    label_key: str = "label",
    seed: int = 0,
) -> dict[str, list[Mapping[str, Any]]]:
    """Split cases into training, validation and test sets for test fold ``fold``.

    Args:
        cases: datalist entries, each with an integer ``fold_key`` in ``[0, num_folds)``.
        fold: the test fold ``k``.
        num_folds: the number of folds ``n``.
        validation: ``"next_fold"`` (fold ``(k + 1) % n``, needs ``n >= 3``), ``"none"`` (empty validation set), or a
            fraction in (0, 1) of the non-test cases, drawn per label (``label_key``) with ``seed``.
        fold_key: key of the fold index in each case.
        label_key: key of the class label (stratifies a fractional validation set; cases without it form one group).
        seed: seed of the fractional validation draw.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` in datalist order.

    Raises:
        ValueError: for a bad argument, or a case without a valid fold (the message names the case index).
    """
    _check_fold(fold, num_folds)
    if isinstance(validation, str):
        if validation not in VALIDATION_MODES:
            raise ValueError(
                f"validation must be one of {VALIDATION_MODES} or a fraction in (0, 1), got {validation!r}."
            )
        if validation == "next_fold" and num_folds < 3:
            raise ValueError(f"validation='next_fold' needs num_folds >= 3 (training would be empty), got {num_folds}.")
    elif isinstance(validation, bool) or not 0.0 < float(validation) < 1.0:
        raise ValueError(f"validation must be one of {VALIDATION_MODES} or a fraction in (0, 1), got {validation!r}.")
    folds = []
    for i, case in enumerate(cases):
        value = case.get(fold_key) if isinstance(case, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < num_folds:
            raise ValueError(f"case {i} has {fold_key}={value!r}, expected an integer in [0, {num_folds}).")
        folds.append(int(value))
    test = [c for c, f in zip(cases, folds) if f == fold]
    rest = [(i, c) for i, (c, f) in enumerate(zip(cases, folds)) if f != fold]
    if validation == "none":
        return {"training": [c for _, c in rest], "validation": [], "test": test}
    if validation == "next_fold":
        val_fold = (fold + 1) % num_folds
        return {
            "training": [c for i, c in rest if folds[i] != val_fold],
            "validation": [c for i, c in rest if folds[i] == val_fold],
            "test": test,
        }
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, c in rest:
        groups.setdefault(str(c.get(label_key)), []).append(i)
    val_ids: set[int] = set()
    for key in sorted(groups):
        members = groups[key]
        count = int(round(float(validation) * len(members)))
        val_ids.update(int(j) for j in rng.permutation(members)[:count])
    return {
        "training": [c for i, c in rest if i not in val_ids],
        "validation": [c for i, c in rest if i in val_ids],
        "test": test,
    }


def load_fold_split(
    datalist: str | os.PathLike,
    fold: int,
    num_folds: int,
    validation: str | float = "next_fold",
    data_list_key: str = "training",
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = DEFAULT_PATH_KEYS,
    **kwargs: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Read a decathlon-style datalist JSON and split it with :func:`fold_split`; relative paths become absolute.

    Args:
        datalist: path of the datalist JSON.
        fold: the test fold.
        num_folds: the number of folds.
        validation: see :func:`fold_split`.
        data_list_key: the list of cases in the JSON (``"training"``, as :func:`chestct.phantoms.generate_cohort`).
        base_dir: folder relative paths refer to (default: the datalist's folder).
        path_keys: case keys holding paths (string values are resolved; absent keys are skipped).
        kwargs: passed to :func:`fold_split` (``fold_key``, ``label_key``, ``seed``).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of new dictionaries.
    """
    path = Path(datalist)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ChestCTInputError(path, f"cannot read the datalist: {e}") from e
    if not isinstance(content, Mapping) or not isinstance(content.get(data_list_key), list):
        raise ChestCTInputError(path, f"the datalist has no list of cases under {data_list_key!r}.")
    base = Path(base_dir) if base_dir is not None else path.parent
    cases = []
    for case in content[data_list_key]:
        case = dict(case)
        for key in path_keys:
            if isinstance(case.get(key), str) and not Path(case[key]).is_absolute():
                case[key] = str((base / case[key]).resolve())
        cases.append(case)
    return fold_split(cases, fold, num_folds, validation=validation, **kwargs)


# ---------------------------------------------------------------------------------------------- summaries


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any] | None], ddof: int = 1) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation of each metric over folds.

    Args:
        fold_metrics: one metric dictionary per fold (``None`` for a failed fold); nested dictionaries are
            flattened with ``"."``, non-numeric values ignored.
        ddof: delta degrees of freedom of the standard deviation (1: sample std, 0: population std).

    Returns:
        ``{metric: {"mean": float, "std": float, "n": int, "values": [per-fold value or None]}}`` in first-seen
        order; ``mean`` and ``std`` ignore NaN values and missing folds; ``std`` is NaN when fewer than
        ``ddof + 1`` values exist.
    """
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be an integer >= 0, got {ddof!r}.")
    flat = [None if m is None else _flatten(m) for m in fold_metrics]
    names: list[str] = []
    for m in flat:
        for name in m or {}:
            if name not in names:
                names.append(name)
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        values = [None if m is None else m.get(name) for m in flat]
        present = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
        n = int(present.size)
        mean = float(present.mean()) if n else math.nan
        std = float(present.std(ddof=ddof)) if n > ddof else math.nan
        summary[name] = {"mean": mean, "std": std, "n": n, "values": values}
    return summary


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def format_markdown(
    summary: Mapping[str, Mapping[str, Any]],
    digits: int = 3,
    title: str | None = None,
    fold_ids: Sequence[int] | None = None,
) -> str:
    """A markdown table ``metric | mean ± std | fold 0 | fold 1 | ...`` of a :func:`summarize_folds` result.

    Missing values show as ``-`` (failed fold or metric not written), undefined ones as ``n/a``.

    Args:
        summary: the output of :func:`summarize_folds`.
        digits: decimals.
        title: optional level-2 heading above the table.
        fold_ids: fold numbers of the value columns (default 0, 1, ...).
    """
    num_folds = max((len(s["values"]) for s in summary.values()), default=0)
    if fold_ids is None:
        fold_ids = list(range(num_folds))
    elif len(fold_ids) != num_folds and summary:
        raise ValueError(f"fold_ids must have {num_folds} entries, got {list(fold_ids)}.")
    lines = [f"## {title}", ""] if title else []
    header = ["metric", "mean ± std"] + [f"fold {k}" for k in fold_ids]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, s in summary.items():
        row = [name, f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)}"]
        row += [_fmt(v, digits) for v in s["values"]] + ["-"] * (num_folds - len(s["values"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- runner


def _config_list(bundle_root: Path, config_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    if not files:
        raise ValueError("config_files must name at least one config file, got an empty list.")
    out = []
    for f in files:
        p = Path(f)
        if not p.is_absolute():
            p = (bundle_root / p) if (bundle_root / p).exists() or not p.exists() else p.resolve()
        if not p.is_file():
            raise ChestCTInputError(p, "config file not found")
        out.append(str(p))
    return out


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_cross_validation(
    bundle_root: str | os.PathLike,
    config_files: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    datalist: str | os.PathLike | None = None,
    folds: int = 5,
    overrides: Mapping[str, Any] | None = None,
    run_ids: Sequence[str] = DEFAULT_RUN_IDS,
    metric_file: str = DEFAULT_METRIC_FILE,
    only_folds: Sequence[int] | None = None,
    run_config_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
    fold_key: str = "fold",
    num_folds_key: str = "num_folds",
    datalist_key: str = "datalist",
    output_dir_key: str = "output_dir",
    ckpt_dir_key: str | None = "ckpt_dir",
    timeout_s: float | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    ddof: int = 1,
    digits: int = 3,
) -> dict[str, Any]:
    """Run ``python -m monai.bundle run <run_id>`` for every run id of every fold, then aggregate the metrics.

    For fold ``k`` the runs receive (through a MONAI ``--args_file``, so values keep their JSON types):
    ``config_file``, ``bundle_root``, ``fold_key = k``, ``num_folds_key = folds``, ``output_dir_key =
    <output_dir>/fold_<k>``, ``ckpt_dir_key = <output_dir>/fold_<k>/models`` (each fold trains, resumes and is
    evaluated from its own checkpoints), ``datalist_key = datalist`` (when given) and ``overrides``
    (``{"train#trainer#max_epochs": 1}``...). Run ids go in order; when one fails the fold's later run ids are
    skipped. The fold's metrics are read from ``metric_file`` (relative to the fold's output dir; ``{fold}`` is
    replaced by ``k``).

    Args:
        bundle_root: the bundle folder (the runs' working directory; relative config files refer to it).
        config_files: one config file or a list merged in order (``configs/train.yaml``, ``configs/evaluate.yaml``).
        output_dir: cross-validation output folder (created).
        datalist: datalist with a ``fold`` per case, or ``None`` to keep the config's own.
        folds: number of folds ``n`` (>= 2).
        overrides: further config overrides, id -> value, for every run.
        run_ids: config ids to run per fold.
        metric_file: the metrics JSON written by the last run id.
        only_folds: run these folds only (default: all); the summary covers the folds run.
        run_config_files: config files merged after ``config_files`` for one run id only, e.g.
            ``{"evaluating": "configs/evaluate.yaml"}``: an evaluation overlay that loads trained weights must not
            be part of the training run.
        fold_key: config key of the test fold.
        num_folds_key: config key of the number of folds.
        datalist_key: config key of the datalist path.
        output_dir_key: config key of the output folder.
        ckpt_dir_key: config key of the checkpoint folder (``None``: left to the config, for bundles that keep
            checkpoints under their output folder; a shared folder would let a fold resume from another's weights).
        timeout_s: time limit per run in seconds (``None``: no limit).
        python: the interpreter (default: this one).
        env: environment of the runs (default: this process's).
        ddof: see :func:`summarize_folds`.
        digits: decimals in the markdown table.

    Returns:
        the content written to ``crossval.json``: ``{"num_folds", "folds": [{"fold", "status" ("ok" | "failed"),
        "error", "metrics", "output_dir", "runs": [{"run_id", "returncode", "seconds", "log"}]}], "summary",
        "failed_folds", "bundle_root", "config_files", "run_config_files", "datalist", "overrides", "run_ids"}``.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    if not run_ids or not all(isinstance(r, str) and r for r in run_ids):
        raise ValueError(f"run_ids must be non-empty config ids, got {run_ids!r}.")
    selected = list(range(folds)) if only_folds is None else [int(k) for k in only_folds]
    bad = [k for k in selected if not 0 <= k < folds]
    if bad or not selected:
        raise ValueError(f"only_folds must be fold indices in [0, {folds}), got {only_folds!r}.")
    root = Path(bundle_root).resolve()
    if not root.is_dir():
        raise ChestCTInputError(root, "bundle_root is not a folder")
    configs = _config_list(root, config_files)
    extra = dict(run_config_files or {})
    unknown = sorted(set(extra) - set(run_ids))
    if unknown:
        raise ValueError(f"run_config_files names run ids {unknown} that are not in run_ids {run_ids}.")
    run_configs = {r: configs + (_config_list(root, extra[r]) if r in extra else []) for r in run_ids}
    datalist_path = None
    if datalist is not None:
        datalist_path = Path(datalist).resolve()
        if not datalist_path.is_file():
            raise ChestCTInputError(datalist_path, "datalist not found")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = python or sys.executable
    run_env = dict(os.environ if env is None else env)

    fold_results = []
    for k in selected:
        fold_dir = out / f"fold_{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        args: dict[str, Any] = {"bundle_root": str(root)}
        args.update({fold_key: k, num_folds_key: int(folds), output_dir_key: str(fold_dir)})
        if ckpt_dir_key:
            args[ckpt_dir_key] = str(fold_dir / "models")
        if datalist_path is not None:
            args[datalist_key] = str(datalist_path)
        args.update(dict(overrides or {}))
        result: dict[str, Any] = {
            "fold": k,
            "status": "ok",
            "error": None,
            "metrics": None,
            "output_dir": str(fold_dir),
            "runs": [],
        }
        for run_id in run_ids:
            log_path = fold_dir / f"{run_id}.log"
            args_file = fold_dir / f"{run_id}_args.json"
            args_file.write_text(json.dumps({"config_file": run_configs[run_id], **args}, indent=2) + "\n")
            cmd = [python, "-m", "monai.bundle", "run", run_id, "--args_file", str(args_file)]
            logger.info("fold %d/%d: %s", k, folds, " ".join(cmd))
            start = time.perf_counter()
            with open(log_path, "w") as log:
                try:
                    code = subprocess.run(
                        cmd, cwd=root, env=run_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
                    ).returncode
                except subprocess.TimeoutExpired:
                    code = None
            seconds = time.perf_counter() - start
            result["runs"].append(
                {"run_id": run_id, "returncode": code, "seconds": round(seconds, 3), "log": str(log_path)}
            )
            if code != 0:
                reason = f"timed out after {timeout_s} s" if code is None else f"exited with status {code}"
                result["status"] = "failed"
                result["error"] = f"{run_id} {reason} (log: {log_path})\n{_tail(log_path)}"
                break
        if result["status"] == "ok":
            metrics_path = Path(metric_file.format(fold=k))
            metrics_path = metrics_path if metrics_path.is_absolute() else fold_dir / metrics_path
            try:
                metrics = json.loads(metrics_path.read_text())
                if not isinstance(metrics, Mapping):
                    raise ValueError(f"expected a JSON object, got {type(metrics).__name__}")
                result["metrics"] = _flatten(metrics)
            except (OSError, ValueError) as e:
                result["status"], result["error"] = "failed", f"cannot read the metrics {metrics_path}: {e}"
        if result["status"] == "failed":
            logger.error("fold %d failed: %s", k, result["error"].splitlines()[0])
        else:
            logger.info("fold %d done: %s", k, result["metrics"])
        fold_results.append(result)

    per_fold: list[Mapping[str, Any] | None] = [None] * folds
    for r in fold_results:
        per_fold[r["fold"]] = r["metrics"]
    if only_folds is not None:
        per_fold = [per_fold[k] for k in selected]
    summary = summarize_folds(per_fold, ddof=ddof)
    report = {
        "num_folds": int(folds),
        "folds_run": selected,
        "failed_folds": [r["fold"] for r in fold_results if r["status"] == "failed"],
        "std_ddof": ddof,
        "summary": summary,
        "folds": fold_results,
        "bundle_root": str(root),
        "config_files": configs,
        "run_config_files": {r: c[len(configs):] for r, c in run_configs.items() if len(c) > len(configs)},
        "datalist": None if datalist_path is None else str(datalist_path),
        "overrides": dict(overrides or {}),
        "run_ids": run_ids,
    }
    (out / "crossval.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    title = f"{len(selected)}-fold cross-validation of {root.name} (mean ± std over folds, ddof={ddof})"
    table = format_markdown(summary, digits=digits, title=title, fold_ids=selected)
    failures = [f"- fold {r['fold']} failed: {r['error'].splitlines()[0]}" for r in fold_results if r["error"]]
    if failures:
        table += "\n" + "\n".join(failures) + "\n"
    (out / "crossval.md").write_text(table)
    return report


# ---------------------------------------------------------------------------------------------- command line


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_config_files(values: list[str]) -> list[str]:
    """``--config_file`` values: paths, or Python/JSON lists of paths as MONAI writes them ("['a.yaml','b.yaml']")."""
    files: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"cannot read the config file list {value!r}: {e}") from e
            files.extend(str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [parsed]))
        else:
            files.append(value)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the cross-validation, print the table, return 0 when every fold succeeded, else 1."""
    parser = argparse.ArgumentParser(
        prog="python -m chestct.crossval",
        description="k-fold cross-validation of a MONAI bundle (training + evaluation per fold, mean +- std).",
    )
    parser.add_argument("--bundle_root", required=True, help="bundle folder")
    parser.add_argument(
        "--config_file",
        action="append",
        required=True,
        help="config file, repeat to merge several (or a list \"['a.yaml','b.yaml']\")",
    )
    parser.add_argument(
        "--run_config_file",
        action="append",
        default=[],
        metavar="RUN_ID=FILE",
        help="config file merged for one run id only (e.g. evaluating=configs/evaluate.yaml); repeatable",
    )
    parser.add_argument("--datalist", default=None, help="datalist JSON whose cases carry a 'fold' key")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--output_dir", required=True, help="output folder (fold_<k>/, crossval.json, crossval.md)")
    parser.add_argument("--run_ids", nargs="+", default=list(DEFAULT_RUN_IDS), help="config ids to run per fold")
    parser.add_argument(
        "--metric_file",
        default=DEFAULT_METRIC_FILE,
        help="metrics JSON relative to each fold's output dir (default metrics.json)",
    )
    parser.add_argument("--only_folds", type=int, nargs="+", default=None, help="run only these folds")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (VALUE parsed as JSON, else a string); repeatable",
    )
    parser.add_argument("--timeout_s", type=float, default=None, help="time limit per run in seconds")
    parser.add_argument("--ddof", type=int, default=1, help="std degrees of freedom: 1 sample (default), 0 population")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--override expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    run_config_files: dict[str, list[str]] = {}
    for item in args.run_config_file:
        run_id, sep, path = item.partition("=")
        if not sep or not run_id or not path:
            parser.error(f"--run_config_file expects RUN_ID=FILE, got {item!r}")
        run_config_files.setdefault(run_id, []).append(path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = run_cross_validation(
            args.bundle_root,
            _parse_config_files(args.config_file),
            args.output_dir,
            datalist=args.datalist,
            folds=args.folds,
            overrides=overrides,
            run_ids=args.run_ids,
            metric_file=args.metric_file,
            only_folds=args.only_folds,
            run_config_files=run_config_files,
            timeout_s=args.timeout_s,
            ddof=args.ddof,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.output_dir) / "crossval.md").read_text())
    if report["failed_folds"]:
        print(f"failed folds: {report['failed_folds']} (see crossval.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
