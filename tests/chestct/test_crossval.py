"""k-fold cross-validation: fold splits, mean +- std by hand, and the runner end to end on a fake bundle."""

from __future__ import annotations

import json
import math

import pytest

from chestct.crossval import fold_split, format_markdown, load_fold_split, main, run_cross_validation, summarize_folds
from chestct.errors import ChestCTInputError

# A fake bundle: "training" writes a marker, "evaluating" writes metrics.json computed from the fold number; the fold
# equal to `fail_fold` raises in the run id named by `fail_in`.
FAKE_CONFIG = """
imports:
  - $import json
  - $import pathlib
  - $import chestct
  - $import chestct.crossval
fold: 0
num_folds: 5
datalist: null
fail_fold: -1
fail_in: evaluating
output_dir: "$@bundle_root + '/out'"
ckpt_dir: "$@bundle_root + '/models'"
training:
  - "$pathlib.Path(@output_dir).mkdir(parents=True, exist_ok=True)"
  - "$pathlib.Path(@ckpt_dir).mkdir(parents=True, exist_ok=True)"
  - "$pathlib.Path(@ckpt_dir, 'model.pt').write_text(str(@fold))"
  - "$1 // 0 if @fold == @fail_fold and @fail_in == 'training' else None"
  - "$pathlib.Path(@output_dir, 'trained.txt').write_text(str(@fold))"
evaluating:
  - "$1 // 0 if @fold == @fail_fold and @fail_in == 'evaluating' else None"
  - "$pathlib.Path(@output_dir, 'metrics.json').write_text(json.dumps({'accuracy': 0.9 + 0.01 * @fold,
     'dice': {'right_upper': 0.5 + 0.1 * @fold}, 'note': 'text',
     'n_test': 0 if @datalist is None
     else len(chestct.crossval.load_fold_split(@datalist, @fold, @num_folds)['test'])}))"
"""


@pytest.fixture
def fake_bundle(tmp_path):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "train.yaml").write_text(FAKE_CONFIG)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({"training": [{"image": f"images/c{i}.nii.gz", "label": i % 2, "fold": i % 3} for i in range(9)]})
    )
    return root, datalist


def test_summarize_folds_by_hand():
    folds = [
        {"acc": 0.9, "auc": 0.8, "dice": {"rul": 0.5}},
        None,
        {"acc": 0.8, "dice": {"rul": 0.7}, "name": "x"},
        {"acc": 1.0, "auc": float("nan")},
    ]
    summary = summarize_folds(folds)
    assert list(summary) == ["acc", "auc", "dice.rul"]
    assert summary["acc"]["mean"] == pytest.approx(0.9)
    assert summary["acc"]["std"] == pytest.approx(0.1)  # sqrt((0 + 0.01 + 0.01) / 2)
    assert summary["acc"]["values"] == [0.9, None, 0.8, 1.0] and summary["acc"]["n"] == 3
    assert summary["dice.rul"]["mean"] == pytest.approx(0.6)
    assert summary["dice.rul"]["std"] == pytest.approx(math.sqrt(0.02))
    assert summary["auc"]["mean"] == pytest.approx(0.8) and math.isnan(summary["auc"]["std"])  # one value
    assert summarize_folds(folds, ddof=0)["acc"]["std"] == pytest.approx(math.sqrt(0.02 / 3))
    table = format_markdown(summary, title="t")
    assert "| acc | 0.900 ± 0.100 | 0.900 | - | 0.800 | 1.000 |" in table
    assert "| auc | 0.800 ± n/a | 0.800 | - | - | n/a |" in table
    with pytest.raises(ValueError, match="-1"):
        summarize_folds(folds, ddof=-1)


def test_fold_split_contract():
    cases = [{"id": i, "label": int(i < 10), "fold": i % 5} for i in range(40)]
    split = fold_split(cases, fold=4, num_folds=5)
    assert {c["fold"] for c in split["test"]} == {4}
    assert {c["fold"] for c in split["validation"]} == {0}  # (k + 1) % n
    assert {c["fold"] for c in split["training"]} == {1, 2, 3}
    none = fold_split(cases, 1, 5, validation="none")
    assert len(none["validation"]) == 0 and len(none["training"]) == 32
    frac = fold_split(cases, 0, 5, validation=0.125, seed=1)  # 70 / 10 / 20 as in the paper
    assert (len(frac["training"]), len(frac["validation"]), len(frac["test"])) == (28, 4, 8)
    assert sum(c["label"] for c in frac["validation"]) == 1  # stratified: 8 severe * 0.125
    assert frac == fold_split(cases, 0, 5, validation=0.125, seed=1)
    ids = sorted(c["id"] for part in frac.values() for c in part)
    assert ids == list(range(40))


@pytest.mark.parametrize(
    "args, bad",
    [((0, 1), "1"), ((5, 5), "5"), ((0, 2), "num_folds >= 3"), ((0, 5, "last"), "last"), ((0, 5, 1.0), "1.0")],
)
def test_fold_split_bad_arguments(args, bad):
    cases = [{"fold": i % 5} for i in range(10)]
    with pytest.raises(ValueError, match=bad):
        fold_split(cases, *args)


def test_fold_split_case_without_fold():
    with pytest.raises(ValueError, match="case 1 has fold=None"):
        fold_split([{"fold": 0}, {"image": "x"}], 0, 3)


def test_load_fold_split_resolves_paths(fake_bundle, tmp_path):
    _, datalist = fake_bundle
    split = load_fold_split(datalist, fold=0, num_folds=3)
    assert [c["image"] for c in split["test"]] == [str(tmp_path / f"images/c{i}.nii.gz") for i in (0, 3, 6)]
    assert {c["fold"] for c in split["validation"]} == {1}
    with pytest.raises(ChestCTInputError, match="cannot read"):
        load_fold_split(tmp_path / "missing.json", 0, 3)


@pytest.mark.slow
def test_run_cross_validation_end_to_end(fake_bundle, tmp_path):
    """Three folds, the training of fold 1 fails: its evaluation is skipped, folds 0 and 2 are summarised."""
    root, datalist = fake_bundle
    out = tmp_path / "cv"
    report = run_cross_validation(
        root, "configs/train.yaml", out, datalist=datalist, folds=3, overrides={"fail_fold": 1, "fail_in": "training"}
    )
    assert report["failed_folds"] == [1]
    failed = report["folds"][1]
    assert failed["status"] == "failed" and "training exited with status" in failed["error"]
    assert [r["run_id"] for r in failed["runs"]] == ["training"]  # evaluating skipped
    assert "ZeroDivisionError" in (out / "fold_1" / "training.log").read_text()
    for k in (0, 2):
        assert (out / f"fold_{k}" / "trained.txt").read_text() == str(k)  # output_dir override reached the config
        assert (out / f"fold_{k}" / "models" / "model.pt").read_text() == str(k)  # one checkpoint folder per fold
        assert report["folds"][k]["metrics"] == pytest.approx(
            {"accuracy": 0.9 + 0.01 * k, "dice.right_upper": 0.5 + 0.1 * k, "n_test": 3}
        )
    assert not (root / "models").exists()  # nothing written into the bundle
    summary = json.loads((out / "crossval.json").read_text())["summary"]
    assert summary["accuracy"]["mean"] == pytest.approx(0.91)
    assert summary["accuracy"]["std"] == pytest.approx(math.sqrt(0.0002))
    assert summary["accuracy"]["values"] == [0.9, None, 0.92]
    table = (out / "crossval.md").read_text()
    assert "| accuracy | 0.910 ± 0.014 | 0.900 | - | 0.920 |" in table and "fold 1 failed" in table


@pytest.mark.slow
def test_cli_one_fold_and_failure_status(fake_bundle, tmp_path, capsys):
    root, _ = fake_bundle
    args = [
        "--bundle_root",
        str(root),
        "--config_file",
        "['configs/train.yaml']",
        "--folds",
        "4",
        "--run_ids",
        "evaluating",
        "--only_folds",
        "2",
        "--output_dir",
        str(tmp_path / "cv"),
    ]
    assert main(args) == 0
    assert "| accuracy | 0.920 ± n/a | 0.920 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert report["folds_run"] == [2] and report["summary"]["n_test"]["values"] == [0.0]
    assert main(args + ["--override", "fail_fold=2"]) == 1  # evaluating raises for fold 2: exit status 1
    assert main(args[:-2] + ["--output_dir", str(tmp_path / "x"), "--only_folds", "7"]) == 2


@pytest.mark.slow
def test_run_config_file_reaches_one_run_id_only(fake_bundle, tmp_path, capsys):
    """An evaluation overlay that would break training (as the bundles' evaluate.yaml loads trained weights) is
    merged into the evaluating run only."""
    root, datalist = fake_bundle
    (root / "configs" / "evaluate.yaml").write_text(
        'training: "$1 // 0"\nevaluating:\n  - "$pathlib.Path(@output_dir, \'metrics.json\')'
        '.write_text(json.dumps({\'accuracy\': 0.5}))"\n'
    )
    args = ["--bundle_root", str(root), "--config_file", "configs/train.yaml", "--datalist", str(datalist),
            "--folds", "3", "--only_folds", "0", "--output_dir", str(tmp_path / "cv"),
            "--run_config_file", "evaluating=configs/evaluate.yaml"]
    assert main(args) == 0
    assert "| accuracy | 0.500 ± n/a | 0.500 |" in capsys.readouterr().out  # the overlay's evaluation ran
    fold = tmp_path / "cv" / "fold_0"
    assert (fold / "trained.txt").read_text() == "0"  # training ran without the overlay
    assert json.loads((fold / "training_args.json").read_text())["config_file"] == [str(root / "configs/train.yaml")]
    assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["run_config_files"] == {
        "evaluating": [str(root / "configs/evaluate.yaml")]
    }
    with pytest.raises(ValueError, match="run ids"):
        run_cross_validation(root, "configs/train.yaml", tmp_path / "bad", run_config_files={"inference": "x.yaml"})
