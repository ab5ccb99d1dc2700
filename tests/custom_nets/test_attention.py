"""Tests of the gated spatial and instance attention modules."""

from __future__ import annotations

import io

import pytest
import torch

from custom_nets.attention import GatedInstanceAttention, GatedSpatialAttention

SPATIAL_CASES = [
    # (in_channels, hidden, normalization, input shape)
    (8, 4, "softmax", (3, 8, 5, 7)),
    (8, 4, "sigmoid", (3, 8, 5, 7)),
    (16, 8, "softmax", (1, 16, 8, 8)),
    (16, 8, "sigmoid", (2, 16, 1, 1)),
]


@pytest.mark.parametrize("in_channels, hidden, normalization, shape", SPATIAL_CASES)
def test_spatial_shapes_and_normalisation(in_channels, hidden, normalization, shape):
    torch.manual_seed(0)
    pool = GatedSpatialAttention(in_channels, hidden, normalization)
    x = torch.randn(shape)
    feature, attention = pool(x)
    n, c, h, w = shape
    assert feature.shape == (n, c)
    assert attention.shape == (n, h, w)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(n))
    # The feature is the attention-weighted sum over positions.
    expected = (x * attention.unsqueeze(1)).sum(dim=(2, 3))
    torch.testing.assert_close(feature, expected)


def test_spatial_sigmoid_uniform_gates_is_average_pooling():
    pool = GatedSpatialAttention(4, 2, "sigmoid")
    torch.nn.init.zeros_(pool.attention_w.weight)  # every position gets the same gate
    x = torch.randn(2, 4, 3, 3)
    feature, attention = pool(x)
    torch.testing.assert_close(feature, x.mean(dim=(2, 3)))
    torch.testing.assert_close(attention, torch.full((2, 3, 3), 1 / 9))


@pytest.mark.parametrize("bag_size", [1, 2, 5])
def test_instance_shapes_sum_to_one(bag_size):
    torch.manual_seed(0)
    pool = GatedInstanceAttention(6, 3)
    x = torch.randn(3, bag_size, 6)
    bag, weights = pool(x)
    assert bag.shape == (3, 6)
    assert weights.shape == (3, bag_size)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(bag, (weights.unsqueeze(-1) * x).sum(dim=1))


def test_instance_matches_ilse_formula():
    torch.manual_seed(1)
    pool = GatedInstanceAttention(4, 3)
    h = torch.randn(1, 5, 4)
    scores = pool.attention_w(torch.tanh(pool.attention_v(h)) * torch.sigmoid(pool.attention_u(h))).squeeze(-1)
    expected = torch.exp(scores) / torch.exp(scores).sum()
    _, weights = pool(h)
    torch.testing.assert_close(weights, expected)


def test_instance_padding_mask():
    torch.manual_seed(2)
    pool = GatedInstanceAttention(6, 3)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    x_padded = x.clone()
    x_padded[1, 2:] = 1e3  # garbage in the padding must not matter
    bag, weights = pool(x_padded, mask)
    assert (weights[1, 2:] == 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    bag_alone, weights_alone = pool(x[1:, :2])
    torch.testing.assert_close(bag[1:], bag_alone)
    torch.testing.assert_close(weights[1:, :2], weights_alone)


def test_instance_all_padding_bag_is_finite():
    pool = GatedInstanceAttention(6, 3)
    x = torch.randn(2, 3, 6, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    bag, weights = pool(x, mask)
    assert (weights[1] == 0).all() and (bag[1] == 0).all()
    bag.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


@pytest.mark.parametrize(
    "factory, error",
    [
        (lambda: GatedSpatialAttention(0, 4), "in_channels"),
        (lambda: GatedSpatialAttention(4, -1), "hidden_channels"),
        (lambda: GatedSpatialAttention(4, 4, "relu"), "relu"),
        (lambda: GatedInstanceAttention(4.5, 4), "4.5"),
        (lambda: GatedInstanceAttention(4, 0), "hidden_features"),
    ],
)
def test_ill_arguments(factory, error):
    with pytest.raises(ValueError, match=error):
        factory()


def test_ill_inputs():
    with pytest.raises(ValueError, match="3 dimensions"):
        GatedSpatialAttention(4, 2)(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="mask shape"):
        GatedInstanceAttention(4, 2)(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_torchscript_round_trip(normalization):
    spatial = torch.jit.script(GatedSpatialAttention(4, 2, normalization))
    instance = torch.jit.script(GatedInstanceAttention(4, 2))
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for module, args in ((spatial, (x,)), (instance, (h, mask))):
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        for a, b in zip(module(*args), loaded(*args)):
            torch.testing.assert_close(a, b)
