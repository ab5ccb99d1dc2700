"""Tests of the instance-bag contrastive loss and the DA-CMIL loss, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from custom_nets.losses.contrastive import DACMILLoss, InstanceBagContrastiveLoss

TAU = 0.5
# Two bags of two 2-d instances. After l2-normalisation: bag 0 -> (1, 0), bag 1 -> (0, -1);
# instances a = (1, 0), b = (0, 1) in bag 0 and c = (1, 1)/sqrt(2), d = (-1, 0) in bag 1.
INSTANCES = torch.tensor([[[3.0, 0.0], [0.0, 0.5]], [[2.0, 2.0], [-4.0, 0.0]]])
BAGS = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
R = 1 / math.sqrt(2)


def _ce(positive: float, others: list[float]) -> float:
    """-log(exp(pos/tau) / (exp(pos/tau) + sum exp(other/tau))) from cosine similarities."""
    denominator = math.exp(positive / TAU) + sum(math.exp(o / TAU) for o in others)
    return -math.log(math.exp(positive / TAU) / denominator)


def test_other_bags_by_hand():
    # Each instance: cosine to its own bag (positive) and to the other bag (negative).
    expected = (
        _ce(1.0, [0.0])  # a: cos(a, z0) = 1, cos(a, z1) = 0
        + _ce(0.0, [-1.0])  # b: 0, -1
        + _ce(-R, [R])  # c: cos(c, z1) = -1/sqrt2, cos(c, z0) = 1/sqrt2
        + _ce(0.0, [-1.0])  # d: cos(d, z1) = 0, cos(d, z0) = -1
    ) / 4
    loss = InstanceBagContrastiveLoss(temperature=TAU)(INSTANCES, BAGS)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_other_bags_and_instances_by_hand():
    # As above plus the instances of the other bag as negatives.
    expected = (
        _ce(1.0, [0.0, R, -1.0])  # a: + cos(a, c), cos(a, d)
        + _ce(0.0, [-1.0, R, 0.0])  # b: + cos(b, c), cos(b, d)
        + _ce(-R, [R, R, R])  # c: + cos(c, a), cos(c, b)
        + _ce(0.0, [-1.0, -1.0, 0.0])  # d: + cos(d, a), cos(d, b)
    ) / 4
    loss = InstanceBagContrastiveLoss(temperature=TAU, negatives="other_bags_and_instances")(INSTANCES, BAGS)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("negatives", ["other_bags", "other_bags_and_instances"])
def test_padding_is_ignored(negatives):
    # Instance d is padding: averaged over a, b, c only, and d is no negative.
    mask = torch.tensor([[True, True], [True, False]])
    padded = INSTANCES.clone()
    padded[1, 1] = torch.tensor([123.0, -7.0])
    if negatives == "other_bags":
        expected = (_ce(1.0, [0.0]) + _ce(0.0, [-1.0]) + _ce(-R, [R])) / 3
    else:
        expected = (_ce(1.0, [0.0, R]) + _ce(0.0, [-1.0, R]) + _ce(-R, [R, R, R])) / 3
    loss_fn = InstanceBagContrastiveLoss(temperature=TAU, negatives=negatives)
    assert loss_fn(padded, BAGS, mask).item() == pytest.approx(expected, rel=1e-5)
    per_instance = InstanceBagContrastiveLoss(TAU, negatives=negatives, reduction="none")(padded, BAGS, mask)
    assert per_instance.shape == (2, 2) and per_instance[1, 1] == 0


def test_single_bag_align_by_hand():
    # One bag: no negatives; the alignment term (1 - cos) / tau: a -> 0, b -> 1 / 0.5.
    loss = InstanceBagContrastiveLoss(temperature=TAU)(INSTANCES[:1], BAGS[:1])
    assert loss.item() == pytest.approx((0.0 + 1.0 / TAU) / 2, rel=1e-6)


def test_single_bag_zero_keeps_graph():
    instances = INSTANCES[:1].clone().requires_grad_(True)
    loss = InstanceBagContrastiveLoss(temperature=TAU, single_bag="zero")(instances, BAGS[:1])
    assert loss.item() == 0.0
    loss.backward()
    assert (instances.grad == 0).all()


def test_empty_bag_does_not_count_as_negative():
    # Bag 1 has no real instance: only bag 0 is left, so the single-bag rule applies.
    mask = torch.tensor([[True, True], [False, False]])
    loss = InstanceBagContrastiveLoss(temperature=TAU)(INSTANCES, BAGS, mask)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_matches_cross_entropy_over_bags_random():
    torch.manual_seed(0)
    inst, bags = torch.randn(3, 4, 5), torch.randn(3, 5)
    logits = torch.einsum("bnd,cd->bnc", F.normalize(inst, dim=-1), F.normalize(bags, dim=-1)) / 0.7
    target = torch.arange(3).repeat_interleave(4)
    expected = F.cross_entropy(logits.reshape(12, 3), target)
    torch.testing.assert_close(InstanceBagContrastiveLoss(0.7)(inst, bags), expected)


def test_gradient_pulls_instances_to_their_bag():
    torch.manual_seed(0)
    inst = torch.randn(2, 3, 4, requires_grad=True)
    bags = torch.randn(2, 4)
    loss_fn = InstanceBagContrastiveLoss(temperature=1.0)
    before = loss_fn(inst, bags)
    before.backward()
    with torch.no_grad():
        after = loss_fn(inst - 0.1 * inst.grad, bags)
    assert after < before


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "-1.0"),
        ({"negatives": "all"}, "all"),
        ({"single_bag": "skip"}, "skip"),
        ({"reduction": "max"}, "max"),
    ],
)
def test_contrastive_ill_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        InstanceBagContrastiveLoss(**kwargs)


def test_contrastive_ill_shapes():
    loss_fn = InstanceBagContrastiveLoss()
    with pytest.raises(ValueError, match="bag_features shape"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 4), torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_dacmil_loss_combination(lam):
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1])
    # CE by hand: bag 0 -> -log softmax([2, -1])[0], bag 1 -> log 2.
    ce = (-(2.0 - math.log(math.exp(2.0) + math.exp(-1.0))) + math.log(2.0)) / 2
    contrastive = InstanceBagContrastiveLoss(temperature=TAU)(INSTANCES, BAGS).item()
    loss_fn = DACMILLoss(lam=lam, temperature=TAU)
    total = loss_fn(logits, labels, INSTANCES, BAGS)
    assert total.item() == pytest.approx(lam * ce + (1 - lam) * contrastive, rel=1e-5)
    assert loss_fn.last_terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert loss_fn.last_terms["contrastive"].item() == pytest.approx(contrastive, rel=1e-5)
    terms = loss_fn.terms(logits, labels.view(2, 1), INSTANCES, BAGS)
    assert set(terms) == {"loss", "ce", "contrastive"}
    assert terms["loss"].item() == pytest.approx(total.item())


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan"), True])
def test_dacmil_loss_ill_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        DACMILLoss(lam=lam)


def test_dacmil_loss_ill_temperature_and_labels():
    with pytest.raises(ValueError, match="temperature"):
        DACMILLoss(temperature=0)
    with pytest.raises(ValueError, match="labels"):
        DACMILLoss()(torch.randn(2, 2), torch.tensor([0, 1, 1]), INSTANCES, BAGS)
