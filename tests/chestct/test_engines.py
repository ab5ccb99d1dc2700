"""MIL engine steps and handlers on a tiny DA-CMIL network."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ROCAUC

from chestct.bags import collate_bags
from chestct.engines import (
    AttentionWriter,
    ClassificationReport,
    FeaturesForward,
    MILEvalStep,
    MILTrainStep,
    ResumeFromCheckpoint,
    bag_pred_onehot,
    classification_metrics,
    latest_checkpoint,
    loss_terms,
    mil_forward,
    require_checkpoint,
)
from custom_nets.dacmil import DACMIL
from custom_nets.losses.contrastive import DACMILLoss


def _batches(num=4, size=32):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(num):
        n = 3 + i % 3
        items.append({"image": torch.rand(n, 1, size, size, generator=g), "label": i % 2, "case_id": f"c{i}",
                      "source": f"/data/c{i}.nii.gz", "slice_indices": torch.arange(n) + 2})
    return [collate_bags(items[:2]), collate_bags(items[2:])]


def _net():
    torch.manual_seed(0)
    return DACMIL(backbone="resnet10", pooling="dual", attention_hidden=16)


def test_train_step_updates_and_logs_terms():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(), network=net,
        optimizer=torch.optim.Adam(net.param_groups(1e-4, 1e-3)), loss_function=DACMILLoss(lam=0.5),
        iteration_update=MILTrainStep(), decollate=False,
    )
    trainer.run()
    out = trainer.state.output
    assert set(out) >= {"loss", "ce", "contrastive", "pred", "label"}
    terms = loss_terms(out)
    assert abs(terms["loss"] - (0.5 * terms["ce"] + 0.5 * terms["contrastive"])) < 1e-5
    assert out["pred"].shape == (2, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_features_forward_and_errors():
    net = _net().eval()
    batch = _batches()[0]
    direct = net.forward_features(batch["image"], batch["mask"])
    wrapped = mil_forward(FeaturesForward(net), batch["image"], batch["mask"])
    assert torch.allclose(direct["logits"], wrapped["logits"])
    with pytest.raises(TypeError):
        FeaturesForward(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        mil_forward(torch.nn.Linear(2, 2), batch["image"], None)


def test_eval_step_and_report(tmp_path):
    net = _net()
    report = ClassificationReport(tmp_path / "report", prefix="test_")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_batches(), network=net, iteration_update=MILEvalStep(),
        key_val_metric={"auc": ROCAUC(output_transform=bag_pred_onehot)}, val_handlers=[report], decollate=False,
    )
    evaluator.run()
    out = evaluator.state.output
    assert torch.allclose(out["pred"].sum(1), torch.ones(2))
    assert out["instance_weights"].shape == out["mask"].shape
    assert torch.allclose(out["instance_weights"].sum(1), torch.ones(2), atol=1e-5)
    assert out["spatial_attention"].shape[:2] == out["mask"].shape
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["num_cases"] == 4 and abs(metrics["auc"] - evaluator.state.metrics["auc"]) < 1e-6
    assert (tmp_path / "report" / "roc.png").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "report" / "per_case.csv")))
    assert [r["case_id"] for r in rows] == ["c0", "c1", "c2", "c3"]


def test_classification_metrics_by_hand():
    m = classification_metrics([0.9, 0.8, 0.3, 0.6, 0.2, 0.1], [1, 1, 1, 0, 0, 0])
    # predictions 1 1 0 1 0 0: TP 2, FN 1, FP 1, TN 2
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(8 / 9)  # 8 of the 9 positive-negative pairs are ordered right
    assert np.isnan(classification_metrics([0.2, 0.4], [1, 1])["auc"])


def test_attention_writer(tmp_path):
    net = _net()
    batch = collate_bags([{"image": torch.rand(3, 1, 32, 32), "case_id": "scan", "source": "/s.nii.gz",
                           "slice_indices": torch.tensor([2, 3, 5]),
                           "geometry": {"input_shape": [20, 18, 9], "input_affine": np.eye(4).tolist(),
                                        "original_affine": np.eye(4).tolist(), "crop_start": [4, 3, 1],
                                        "crop_shape": [12, 10, 6]}}])
    failed = collate_bags([{"image": None, "case_id": "bad", "error": "no lungs found"}])
    writer = AttentionWriter(tmp_path, top_k=2)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[batch, failed], network=net,
                                    iteration_update=MILEvalStep(keep_images=True), val_handlers=[writer],
                                    decollate=False)
    evaluator.run()
    report = json.loads((tmp_path / "scan" / "prediction.json").read_text())
    assert [s["index"] for s in report["slices"]] and {s["index"] for s in report["slices"]} == {3, 4, 6}
    assert report["slices"][0]["weight"] >= report["slices"][-1]["weight"]
    volume = nib.load(tmp_path / "scan" / "attention.nii.gz").get_fdata()
    assert volume.shape == (20, 18, 9) and volume.max() == pytest.approx(1.0, abs=1e-5)
    nonzero = np.argwhere(volume > 0)
    assert set(nonzero[:, 2]) <= {3, 4, 6} and nonzero[:, 0].min() >= 4 and nonzero[:, 0].max() < 16
    assert (tmp_path / "scan" / "attention_top_slices.png").stat().st_size > 0
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    assert rows["scan"]["status"] == "ok" and rows["bad"]["status"] == "failed"
    assert rows["bad"]["reason"] == "no lungs found"


def test_checkpoint_helpers(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        require_checkpoint(tmp_path / "model.pt")
    assert latest_checkpoint(tmp_path) is None
    net = _net()
    for epoch in (2, 10):
        torch.save({"model": net.state_dict()}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=11, train_data_loader=_batches(), network=net,
        optimizer=torch.optim.Adam(net.parameters()), loss_function=DACMILLoss(), iteration_update=MILTrainStep(),
        train_handlers=[ResumeFromCheckpoint(tmp_path, {"model": net})], decollate=False,
    )
    trainer.run()
    assert trainer.state.epoch == 11 and trainer.state.iteration == 22  # one epoch of 2 iterations after 10
