"""M2UNet multi-task loss: terms against MONAI/PyTorch references, averaging over labelled bags only, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from custom_nets.losses.multitask import M2UNetLoss

B, N, C, H, W = 4, 3, 6, 16, 16


def _batch(seed: int = 0, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(B, 2, generator=generator)
    labels = torch.tensor([0, 1, 1, 0])
    seg_logits = torch.randn(B, N, C, H, W, generator=generator)
    lobes = torch.randint(0, C, (B, N, H, W), generator=generator)
    lobes[:, :, :4] = 0  # some background and some absent lobes in places, as in real patches
    lobes[0, 0, 8:] = 2
    if requires_grad:
        class_logits.requires_grad_(True)
        seg_logits.requires_grad_(True)
    return class_logits, labels, seg_logits, lobes


def test_classification_term_is_weighted_cross_entropy():
    class_logits, labels, _, _ = _batch()
    terms = M2UNetLoss(lam=0.01).terms(class_logits, labels)
    expected = F.cross_entropy(class_logits, labels)
    torch.testing.assert_close(terms["classification"], expected)
    torch.testing.assert_close(terms["loss"], 0.01 * expected)
    assert terms["segmentation"].item() == 0.0


@pytest.mark.parametrize("include_background", [True, False])
def test_all_labelled_equals_monai_dice_ce(include_background):
    class_logits, labels, seg_logits, lobes = _batch()
    terms = M2UNetLoss(lam=0.5, include_background_in_dice=include_background).terms(
        class_logits, labels, seg_logits, lobes
    )
    # all bags labelled, equal patches: the mean over bags of patch means is the mean over all patches
    reference = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True)
    expected_seg = reference(seg_logits.flatten(0, 1), lobes.flatten(0, 1)[:, None])
    torch.testing.assert_close(terms["segmentation"], expected_seg)
    torch.testing.assert_close(terms["loss"], 0.5 * F.cross_entropy(class_logits, labels) + expected_seg)
    assert terms["labelled_bags"].item() == B


def test_bag_dice_equals_monai_dice_over_each_bag_volume():
    _, _, seg_logits, lobes = _batch()
    terms = M2UNetLoss(dice_over="bag").segmentation_terms(seg_logits, lobes)
    # each bag as one volume (C, N, H, W): Dice per bag and class, then the mean
    reference = DiceLoss(to_onehot_y=True, softmax=True)
    expected = reference(seg_logits.permute(0, 2, 1, 3, 4), lobes[:, None])
    torch.testing.assert_close(terms["seg_dice"], expected)


@pytest.mark.parametrize("dice_over", ["patch", "bag"])
@pytest.mark.parametrize("has_lobes", [[True, False, True, False], [False, False, False, True]])
def test_mixed_batch_averages_over_labelled_bags_only(dice_over, has_lobes):
    class_logits, labels, seg_logits, lobes = _batch()
    loss_fn = M2UNetLoss(lam=0.01, dice_over=dice_over)
    mixed = loss_fn.terms(class_logits, labels, seg_logits, lobes, has_lobes=torch.tensor(has_lobes))
    # each labelled bag on its own, then the plain mean over them
    alone = [loss_fn.segmentation_terms(seg_logits[i : i + 1], lobes[i : i + 1]) for i, h in enumerate(has_lobes) if h]
    for key in ("segmentation", "seg_ce", "seg_dice"):
        torch.testing.assert_close(mixed[key], torch.stack([t[key] for t in alone]).mean())
    torch.testing.assert_close(mixed["loss"], 0.01 * F.cross_entropy(class_logits, labels) + mixed["segmentation"])
    assert mixed["labelled_bags"].item() == sum(has_lobes)


def test_ignore_filled_maps_count_as_unlabelled():
    class_logits, labels, seg_logits, lobes = _batch()
    loss_fn = M2UNetLoss()
    filled = lobes.clone()
    filled[1] = -1
    filled[3] = -1
    by_flag = loss_fn.terms(class_logits, labels, seg_logits, lobes, has_lobes=torch.tensor([1, 0, 1, 0]).bool())
    by_fill = loss_fn.terms(class_logits, labels, seg_logits, filled)
    for key, value in by_flag.items():
        torch.testing.assert_close(by_fill[key], value)


def test_ignored_pixels_are_left_out():
    _, _, seg_logits, lobes = _batch()
    partial = lobes.clone()
    partial[:, :, 8:] = -1  # only the top half of every patch is annotated
    got = M2UNetLoss().segmentation_terms(seg_logits, partial)
    expected = M2UNetLoss().segmentation_terms(seg_logits[..., :8, :], lobes[..., :8, :])
    for key in ("seg_ce", "seg_dice"):
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize("dice_over", ["patch", "bag"])
def test_padded_patches_are_left_out(dice_over):
    _, _, seg_logits, lobes = _batch()
    mask = torch.tensor([[True, True, False]] * B)
    got = M2UNetLoss(dice_over=dice_over).segmentation_terms(seg_logits, lobes, mask=mask)
    expected = M2UNetLoss(dice_over=dice_over).segmentation_terms(seg_logits[:, :2], lobes[:, :2])
    torch.testing.assert_close(got["segmentation"], expected["segmentation"])


@pytest.mark.parametrize("lobes_given", [True, False])
def test_no_labelled_bag_gives_zero_in_the_graph(lobes_given):
    class_logits, labels, seg_logits, lobes = _batch(requires_grad=True)
    loss_fn = M2UNetLoss(lam=0.01)
    if lobes_given:
        terms = loss_fn.terms(class_logits, labels, seg_logits, lobes, has_lobes=torch.zeros(B, dtype=torch.bool))
    else:
        terms = loss_fn.terms(class_logits, labels, seg_logits, None)
    assert terms["segmentation"].item() == 0.0 and terms["labelled_bags"].item() == 0
    assert terms["segmentation"].requires_grad
    torch.testing.assert_close(terms["loss"], 0.01 * F.cross_entropy(class_logits, labels))
    terms["loss"].backward()
    assert torch.equal(seg_logits.grad, torch.zeros_like(seg_logits))
    assert class_logits.grad.abs().sum() > 0


def test_gradients_reach_labelled_bags_only():
    class_logits, labels, seg_logits, lobes = _batch(requires_grad=True)
    M2UNetLoss()(class_logits, labels, seg_logits, lobes, has_lobes=torch.tensor([True, False, False, True])).backward()
    assert seg_logits.grad[0].abs().sum() > 0 and seg_logits.grad[3].abs().sum() > 0
    assert torch.equal(seg_logits.grad[1:3], torch.zeros_like(seg_logits[1:3]))


def test_end_to_end_with_m2unet():
    from custom_nets.m2unet import M2UNet

    torch.manual_seed(0)
    net = M2UNet(features=4, bottleneck_features=8, emb_concepts=6, img_concepts=4, gcp_regularization=0.1)
    bags = torch.rand(2, 2, 1, 32, 32)
    lobes = torch.randint(0, 6, (2, 2, 1, 32, 32))
    class_logits, seg_logits = net(bags)
    terms = M2UNetLoss().terms(
        class_logits,
        torch.tensor([0, 1]),
        seg_logits,
        lobes,
        has_lobes=torch.tensor([True, False]),
        regularization=net.regularization_loss(),
    )
    assert terms["regularization"].item() > 0
    terms["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_variants_and_regularization():
    class_logits, labels, seg_logits, lobes = _batch()
    loss_fn = M2UNetLoss(lam=0.1, regularization_weight=2.0)
    seg_only = loss_fn.terms(None, None, seg_logits, lobes)
    torch.testing.assert_close(seg_only["loss"], seg_only["segmentation"])
    reg = torch.tensor(0.25)
    with_reg = loss_fn(class_logits, labels, regularization=reg)
    torch.testing.assert_close(with_reg, 0.1 * F.cross_entropy(class_logits, labels) + 2.0 * reg)
    lobes5 = lobes[:, :, None]  # (B, N, 1, H, W) labels as a channel-first transform would give them
    torch.testing.assert_close(loss_fn(None, None, seg_logits, lobes5), seg_only["loss"])


def test_class_weight():
    class_logits, labels, _, _ = _batch()
    got = M2UNetLoss(lam=1.0, class_weight=[1.0, 4.0])(class_logits, labels)
    torch.testing.assert_close(got, F.cross_entropy(class_logits, labels, weight=torch.tensor([1.0, 4.0])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": -0.01}, "-0.01"),
        ({"lambda_dice": float("nan")}, "lambda_dice"),
        ({"dice_over": "image"}, "image"),
        ({"smooth_dr": -1.0}, "smooth_dr"),
        ({"class_weight": [1.0, -2.0]}, "-2.0"),
    ],
)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M2UNetLoss(**kwargs)


def test_ill_inputs():
    class_logits, labels, seg_logits, lobes = _batch()
    loss_fn = M2UNetLoss()
    with pytest.raises(ValueError, match="at least one"):
        loss_fn(None, None)
    with pytest.raises(ValueError, match="labels are needed"):
        loss_fn(class_logits, None)
    with pytest.raises(ValueError, match="severity labels"):
        loss_fn(class_logits, labels[:3])
    bad = lobes.clone()
    bad[0, 0, 0, 0] = C
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        loss_fn(class_logits, labels, seg_logits, bad)
    # out-of-range values in an unlabelled bag are not looked at
    loss_fn(class_logits, labels, seg_logits, bad, has_lobes=torch.tensor([False, True, True, True]))
    with pytest.raises(ValueError, match="lobe labels of shape"):
        loss_fn(class_logits, labels, seg_logits, lobes[:, :2])
    with pytest.raises(ValueError, match="has_lobes"):
        loss_fn(class_logits, labels, seg_logits, lobes, has_lobes=torch.ones(3, dtype=torch.bool))
