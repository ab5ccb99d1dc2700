"""M2UNet engine steps: the training step's decoder subset; the evaluation step's fast inference copy gives the outputs
of the network and follows its weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from torch import nn

from chestct.multitask_engine import M2UNetEvalStep, M2UNetTrainStep
from chestct.patch_bags import RandomPatchBagd
from custom_nets.losses.multitask import M2UNetLoss
from custom_nets.m2unet import M2UNet

TINY = {"features": 8, "bottleneck_features": 16, "emb_concepts": 8, "img_concepts": 4}
PATCH = 32


def _net() -> M2UNet:
    """A tiny M2UNet whose batch norms are far from the identity, so that folding them wrongly would show."""
    torch.manual_seed(0)
    net = M2UNet(**TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def _scans(num: int = 2) -> list[dict]:
    """Whole preprocessed scans as the step receives them (``first_item`` collation): image (1, X, Y, Z) in [0, 1]."""
    g = torch.Generator().manual_seed(3)
    scans = []
    for i in range(num):
        shape = (1, 40, 36 + 4 * i, 5)
        body = torch.zeros(shape)
        body[:, 4:-4, 4:-4] = 1
        scans.append({
            "image": MetaTensor(torch.rand(shape, generator=g), affine=torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))),
            "body": body,
            "lobes": torch.randint(0, 6, shape, generator=g).float(),
            "label": i % 2,
            "case_id": f"case{i}",
        })
    return scans


def _step(fast_inference: bool, **kwargs) -> M2UNetEvalStep:
    bagger = RandomPatchBagd(keys=("image", "lobes"), num_patches=3, patch_size=PATCH, body_key="body",
                             missing_label_value=-1)
    settings = {"num_draws": 2, "patch_dice": True, "segment_volume": True, "roi_size": PATCH, "sw_batch_size": 4,
                "chunk_size": 2, **kwargs}
    return M2UNetEvalStep(bagger, fast_inference=fast_inference, **settings)


def _evaluator(net: nn.Module, step: M2UNetEvalStep, scans: list[dict]) -> tuple[SupervisedEvaluator, list[dict]]:
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=scans, network=net,
                                    iteration_update=step, decollate=False)
    outputs: list[dict] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    return evaluator, outputs


def _assert_same_outputs(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g["case_id"] == e["case_id"]
        torch.testing.assert_close(g["pred"], e["pred"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g["draw_probabilities"], e["draw_probabilities"], rtol=1e-4, atol=1e-5)
        # labels are argmaxes: a near tie may flip under float rounding, so allow a handful of pixels
        for key in ("patch_seg_pred", "lobes_pred"):
            assert (key in g) == (key in e), key
            if key not in e:
                continue
            assert g[key].shape == e[key].shape
            assert (g[key] != e[key]).float().mean() < 1e-3, key


def _outputs(net: nn.Module, fast_inference: bool, scans: list[dict], **kwargs) -> list[dict]:
    evaluator, outputs = _evaluator(net, _step(fast_inference, **kwargs), scans)
    evaluator.run()
    return outputs


@pytest.mark.parametrize("whole_slice", [False, True])
def test_fast_inference_gives_the_same_outputs(whole_slice):
    net, scans = _net(), _scans()
    fast = _outputs(net, True, scans, whole_slice=whole_slice)
    plain = _outputs(net, False, scans, whole_slice=whole_slice)
    _assert_same_outputs(fast, plain)
    assert all(not m.training for m in net.modules())  # the step puts the network in eval mode


def test_fast_inference_runs_a_folded_channels_last_copy():
    net, scans = _net(), _scans(1)
    step = _step(True)
    evaluator, _ = _evaluator(net, step, scans)
    evaluator.run()
    copy = step.inference_network(evaluator)
    assert copy is not net and not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    assert copy.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the network itself is untouched
    evaluator, _ = _evaluator(net, _step(False), scans)
    assert _step(False).inference_network(evaluator) is net


def _sgd_step(net: nn.Module) -> None:
    """An optimizer step of training between two validations: in-place updates of every weight."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    class_logits, seg_logits = net(torch.rand(1, 2, 1, PATCH, PATCH))
    (class_logits.sum() + seg_logits.square().mean()).backward()
    optimizer.step()


def _load_other_weights(net: nn.Module) -> None:
    """A checkpoint loaded between two runs (as CheckpointLoader does at the start of a run)."""
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    net.load_state_dict(other.state_dict())


def _swap_tensors(net: nn.Module) -> None:
    """New tensors behind the same parameters (``param.data = ...``, as Module.to does), version counters unchanged."""
    for p in net.parameters():
        p.data = p.data + torch.randn_like(p) * 0.3


@pytest.mark.parametrize("change", [_sgd_step, _load_other_weights, _swap_tensors])
@pytest.mark.parametrize("track_weights", [True, False])
def test_copy_is_rebuilt_when_the_weights_change_between_runs(change, track_weights, monkeypatch):
    # validation during training: one step, one evaluator, runs at epochs 1 and 2 (as ValidationHandler calls it)
    if not track_weights:  # the new run alone must trigger the rebuild
        monkeypatch.setattr("chestct.multitask_engine._weights_key", lambda net: ("constant",))
    net, scans = _net(), _scans(1)
    evaluator, outputs = _evaluator(net, _step(True, segment_volume=False), scans)  # as train.yaml's validation
    evaluator.run(global_epoch=1)
    first = list(outputs)
    change(net)
    outputs.clear()
    evaluator.run(global_epoch=2)
    expected = _outputs(net, False, scans, segment_volume=False)  # the network itself, with the new weights
    assert not torch.allclose(first[0]["pred"], expected[0]["pred"], atol=1e-3)  # the change shows
    _assert_same_outputs(outputs, expected)


def test_copy_is_rebuilt_when_the_weights_change_within_a_run():
    net, scans = _net(), _scans(2)
    evaluator, outputs = _evaluator(net, _step(True, segment_volume=False), scans)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: _sgd_step(net))
    evaluator.run()
    expected = _outputs(net, False, scans, segment_volume=False)
    _assert_same_outputs(outputs[1:], expected[1:])


def test_copy_is_kept_while_the_weights_do_not_change():
    net, scans = _net(), _scans(3)
    step = _step(True, segment_volume=False)
    evaluator, _ = _evaluator(net, step, scans)
    copies: list[nn.Module] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: copies.append(step._fast_network))
    evaluator.run()
    assert len(copies) == 3 and copies[0] is copies[1] is copies[2]


def test_fast_inference_needs_a_python_network():
    net = torch.jit.script(_net().eval())
    evaluator, _ = _evaluator(net, _step(True), _scans(1))
    with pytest.raises(TypeError, match="fast_inference=False"):
        evaluator.run()


class _Recorder(nn.Module):
    """Wraps a network and its loss to record what the training step hands them."""

    def __init__(self, net: M2UNet) -> None:
        super().__init__()
        self.net = net
        self.calls: list[dict] = []
        self.has_segmentation = net.has_segmentation

    def regularization_loss(self) -> torch.Tensor:
        return self.net.regularization_loss()

    def forward(self, x, mask=None, with_segmentation=True, seg_index=None):
        self.calls.append({"with_segmentation": with_segmentation, "seg_index": seg_index})
        return self.net(x, mask, with_segmentation, seg_index)


def _train_once(
    step: M2UNetTrainStep, has_lobes: list[bool], num_patches: int = 5, seed: int = 0
) -> tuple[_Recorder, dict, dict]:
    torch.manual_seed(seed)
    recorder = _Recorder(M2UNet(**TINY))
    loss = M2UNetLoss(lam=1.0)
    seen: dict = {}

    def terms(class_logits, labels, seg_logits, lobes, **kwargs):
        seen.update(seg_logits=seg_logits, lobes=lobes)
        return loss.terms(class_logits, labels, seg_logits, lobes, **kwargs)

    engine = SimpleNamespace(
        network=recorder,
        optimizer=torch.optim.SGD(recorder.parameters(), lr=0.01),
        loss_function=SimpleNamespace(terms=terms),
        state=SimpleNamespace(device=torch.device("cpu"), iteration=1),
    )
    b = len(has_lobes)
    lobes = torch.randint(0, 6, (b, num_patches, PATCH, PATCH))
    lobes[~torch.tensor(has_lobes)] = -1
    batch = {"image": torch.rand(b, num_patches, 1, PATCH, PATCH), "label": torch.arange(b) % 2, "lobes": lobes,
             "has_lobes": torch.tensor(has_lobes)}
    output = step(engine, batch)
    return recorder, seen, {"batch": batch, "output": output}


@pytest.mark.parametrize("k, expected", [(None, 5), (2, 2), (1, 1), (5, 5), (9, 5)])
def test_train_step_segments_a_random_subset_of_each_bag(k, expected):
    recorder, seen, run = _train_once(M2UNetTrainStep(seg_patches_per_bag=k), [True, False])
    index = recorder.calls[0]["seg_index"]
    assert seen["seg_logits"].shape[:2] == (2, expected)
    if expected == 5:
        assert index is None  # the whole bag, no indexing
        torch.testing.assert_close(seen["lobes"], run["batch"]["lobes"])
    else:
        assert len(set(index.tolist())) == expected and 0 <= int(index.min()) and int(index.max()) < 5
        # the segmentation loss sees the lobes of the same patches as the decoder
        torch.testing.assert_close(seen["lobes"], run["batch"]["lobes"][:, index])
    assert torch.isfinite(run["output"]["loss"]) and run["output"]["segmentation"] > 0


def test_train_step_subset_is_random():
    step = M2UNetTrainStep(seg_patches_per_bag=2)
    draws = {tuple(_train_once(step, [True], num_patches=6, seed=seed)[0].calls[0]["seg_index"].tolist())
             for seed in range(8)}
    assert len(draws) > 1


def test_train_step_skips_the_decoder_without_lobes():
    recorder, seen, _ = _train_once(M2UNetTrainStep(seg_patches_per_bag=2), [False, False])
    assert recorder.calls[0]["with_segmentation"] is False and recorder.calls[0]["seg_index"] is None
    assert seen["seg_logits"] is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_train_step_rejects_a_bad_subset_size(bad):
    with pytest.raises(ValueError, match="seg_patches_per_bag"):
        M2UNetTrainStep(seg_patches_per_bag=bad)
