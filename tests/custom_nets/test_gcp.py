"""Global contrast pooling: values against hand computation, masking, regulariser, TorchScript, ill arguments."""

from __future__ import annotations

import math

import pytest
import torch

from custom_nets.gcp import GlobalContrastPooling

# Concepts and instances of a tiny D = 2 example whose cosines are easy to write down.
CONCEPTS = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
INSTANCES = [[3.0, 4.0], [1.0, 0.0], [-2.0, 0.0]]


def _cosine(a: list[float], b: list[float]) -> float:
    return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))


def _gcp(pooling: str = "max", temperature: float = 0.1) -> GlobalContrastPooling:
    gcp = GlobalContrastPooling(in_features=2, num_concepts=3, pooling=pooling, temperature=temperature)
    with torch.no_grad():
        gcp.concepts.copy_(torch.tensor(CONCEPTS))
    return gcp


def test_max_matches_hand_computation():
    out = _gcp()(torch.tensor([INSTANCES]))
    # concept [1, 0]: cosines 0.6, 1, -1; concept [0, 2]: 0.8, 0, 0;
    # concept [1, 1]: 7 / (5 sqrt 2), 1 / sqrt 2, -1 / sqrt 2
    expected = [max(_cosine(w, phi) for phi in INSTANCES) for w in CONCEPTS]
    assert expected == pytest.approx([1.0, 0.8, 7.0 / (5.0 * math.sqrt(2.0))])
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_lse_matches_hand_computation(temperature):
    out = _gcp("lse", temperature)(torch.tensor([INSTANCES]))
    expected = [
        temperature * math.log(sum(math.exp(_cosine(w, phi) / temperature) for phi in INSTANCES) / len(INSTANCES))
        for w in CONCEPTS
    ]
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=0, atol=1e-5)
    cos = _gcp().similarity(torch.tensor([INSTANCES]))
    # a smooth maximum: between the mean and the maximum over instances
    assert bool((out >= cos.mean(dim=1) - 1e-6).all()) and bool((out <= cos.amax(dim=1) + 1e-6).all())


@pytest.mark.parametrize("pooling", ["max", "lse"])
def test_padded_instances_never_win(pooling):
    gcp = _gcp(pooling)
    real = torch.tensor([INSTANCES])
    # the padded instance is concept 2 itself (cosine 1 with it): it would win the max if it were counted
    padded = torch.cat([real, torch.tensor([[[0.0, 5.0]]])], dim=1)
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(gcp(padded, mask), gcp(real))
    # the same instance counted changes concept 2
    if pooling == "max":
        assert gcp(padded)[0, 1].item() == pytest.approx(1.0)
    else:
        assert gcp(padded)[0, 1] > gcp(real)[0, 1]


@pytest.mark.parametrize("pooling", ["max", "lse"])
def test_empty_bag_gives_zeros_and_finite_gradients(pooling):
    gcp = GlobalContrastPooling(4, 3, pooling=pooling)
    x = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    out = gcp(x, mask)
    assert torch.equal(out[1], torch.zeros(3))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gcp.concepts.grad).all()
    # masked instances get no gradient
    assert torch.equal(x.grad[0, 1], torch.zeros(4)) and torch.equal(x.grad[1], torch.zeros(5, 4))


def test_max_gradient_reaches_only_the_winning_instance():
    gcp = _gcp()
    x = torch.tensor([INSTANCES], requires_grad=True)
    gcp(x)[0, 1].backward()  # concept [0, 2]: instance 0 wins
    assert x.grad[0, 0].abs().sum() > 0
    assert torch.equal(x.grad[0, 1:], torch.zeros(2, 2))


@pytest.mark.parametrize("batch, instances, features, concepts", [(1, 1, 3, 1), (2, 64, 16, 8), (3, 5, 512, 256)])
@pytest.mark.parametrize("pooling", ["max", "lse"])
def test_shapes_and_range(batch, instances, features, concepts, pooling):
    out = GlobalContrastPooling(features, concepts, pooling=pooling)(torch.randn(batch, instances, features))
    assert out.shape == (batch, concepts)
    assert bool((out.abs() <= 1.0 + 1e-5).all())


def test_zero_instance_has_cosine_zero():
    out = GlobalContrastPooling(3, 2)(torch.zeros(1, 1, 3))
    assert torch.equal(out, torch.zeros(1, 2))


def test_regularization_loss_values():
    gcp = GlobalContrastPooling(2, 2, regularization=0.5)
    with torch.no_grad():
        gcp.concepts.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    # two off-diagonal cosines of 1 / sqrt 2: mean of their squares is 1 / 2
    assert gcp.regularization_loss().item() == pytest.approx(0.5 * 0.5)
    with torch.no_grad():
        gcp.concepts.copy_(torch.tensor([[3.0, 0.0], [0.0, -2.0]]))
    assert gcp.regularization_loss().item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        gcp.concepts.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert gcp.regularization_loss().item() == pytest.approx(0.5)


def test_regularization_loss_gradient_and_disabled():
    gcp = GlobalContrastPooling(8, 4, regularization=1.0)
    gcp.regularization_loss().backward()
    assert gcp.concepts.grad.abs().sum() > 0
    off = GlobalContrastPooling(8, 4)
    assert off.regularization_loss().item() == 0.0 and off.regularization_loss().requires_grad


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # still what MONAI bundles export with
@pytest.mark.parametrize("pooling", ["max", "lse"])
def test_torchscript_round_trip(tmp_path, pooling):
    gcp = GlobalContrastPooling(6, 4, regularization=0.1, pooling=pooling)
    scripted = torch.jit.script(gcp)
    path = tmp_path / "gcp.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.testing.assert_close(loaded(x, mask), gcp(x, mask))
    torch.testing.assert_close(loaded(x), gcp(x))
    torch.testing.assert_close(loaded.regularization_loss(), gcp.regularization_loss())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_features": 0, "num_concepts": 2}, "in_features"),
        ({"in_features": 2, "num_concepts": -1}, "-1"),
        ({"in_features": 2, "num_concepts": 2, "regularization": -0.1}, "-0.1"),
        ({"in_features": 2, "num_concepts": 2, "regularization": float("nan")}, "nan"),
        ({"in_features": 2, "num_concepts": 2, "pooling": "mean"}, "mean"),
        ({"in_features": 2, "num_concepts": 2, "pooling": "lse", "temperature": 0.0}, "temperature"),
    ],
)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalContrastPooling(**kwargs)


def test_ill_inputs():
    gcp = GlobalContrastPooling(4, 2)
    with pytest.raises(ValueError, match="4"):
        gcp(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        gcp(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
