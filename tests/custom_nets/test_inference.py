"""Inference copies: batch norm folded into convolutions, channels-last; same outputs, original untouched, ill args."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from custom_nets.inference import fuse_conv_bn, inference_copy, to_channels_last
from custom_nets.m2unet import M2UNet

TINY = {"features": 8, "bottleneck_features": 16, "emb_concepts": 8, "img_concepts": 4}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _randomise_norms(net: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that an unfolded or wrongly folded batch
    norm shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, NORMS):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


def _m2unet(**kwargs) -> M2UNet:
    torch.manual_seed(0)
    return _randomise_norms(M2UNet(**{**TINY, **kwargs}))


def _conv_bn_relu() -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),  # nested, no conv bias
    )
    return _randomise_norms(block)


def _count(net: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


# (builder, call, input): every entry point of M2UNet, and a plain conv-BN-ReLU stack
CASES = [
    ("m2unet_segment", _m2unet, lambda net, x: net.segment(x), (2, 1, 48, 32)),
    ("m2unet_segment_bilinear", lambda: _m2unet(upsample_mode="bilinear"), lambda net, x: net.segment(x),
     (2, 1, 32, 32)),
    ("m2unet_classify", _m2unet, lambda net, x: net.classify(x, None, 2), (2, 3, 1, 32, 32)),
    ("m2unet_forward", _m2unet, lambda net, x: net(x), (1, 3, 1, 32, 48)),
    ("conv_bn_relu", _conv_bn_relu, lambda net, x: net(x), (2, 3, 16, 12)),
]


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name, build, call, shape", CASES, ids=[c[0] for c in CASES])
def test_copy_gives_the_outputs_of_the_original(name, build, call, shape, channels_last):
    net = build().eval()
    fast = inference_copy(net, channels_last=channels_last)
    assert _count(fast, NORMS) == 0 and _count(net, NORMS) > 0
    assert _count(fast, nn.Conv2d) == _count(net, nn.Conv2d)
    assert not fast.training
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = _outputs(call(net, x)), _outputs(call(fast, x))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    if channels_last:
        conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_original_is_not_modified():
    net = _m2unet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules_before = [type(m) for m in net.modules()]
    fast = inference_copy(net)
    with torch.no_grad():
        fast.segment(torch.rand(2, 1, 32, 32))
    assert net.training and all(m.training for m in net.modules())
    assert [type(m) for m in net.modules()] == modules_before
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.is_contiguous() for p in net.parameters())  # the original's memory format is untouched
    assert all(a is not b for a, b in zip(net.parameters(), fast.parameters()))


def test_running_statistics_are_used_not_those_of_the_batch():
    # a network in train mode normalises with the batch's statistics; the copy must always use the running ones
    net = _conv_bn_relu().train()
    x = torch.rand(4, 3, 8, 8) * 5 + 3  # statistics far from the running ones
    fast = fuse_conv_bn(net)
    with torch.no_grad():
        got = fast(x)
        eval_mode = net.eval()(x)
        train_mode = net.train()(x)  # (after the eval pass: it updates the running statistics)
    torch.testing.assert_close(got, eval_mode, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, train_mode, atol=1e-2)


def test_fused_copy_scripts():
    net = _m2unet().eval()
    scripted = torch.jit.script(inference_copy(net))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted.segment(x), net.segment(x), rtol=1e-4, atol=1e-5)


def test_channels_last_3d():
    torch.manual_seed(0)
    net = _randomise_norms(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())).eval()
    fast = inference_copy(net)
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last_3d) and isinstance(fast[1], nn.Identity)
    x = torch.rand(1, 2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


class _ScaledConv(nn.Conv2d):
    """A convolution subclass with its own forward: folding into its weights would change the result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda conv: nn.Sequential(conv, nn.BatchNorm2d(3), conv), id="shared_conv"),
        pytest.param(lambda conv: nn.Sequential(_ScaledConv(3, 3, 1), nn.BatchNorm2d(3)), id="conv_subclass"),
        pytest.param(lambda conv: nn.Sequential(conv, nn.ReLU(), nn.BatchNorm2d(3)), id="not_adjacent"),
        pytest.param(lambda conv: nn.Sequential(nn.ConvTranspose2d(3, 3, 1), nn.BatchNorm2d(3)), id="transposed"),
    ],
)
def test_pairs_that_cannot_be_folded_are_left_alone(build):
    torch.manual_seed(0)
    net = _randomise_norms(build(nn.Conv2d(3, 3, 1))).eval()
    fast = fuse_conv_bn(net)
    assert _count(fast, NORMS) == _count(net, NORMS) == 1
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))


def test_ill_arguments():
    with pytest.raises(TypeError, match="list"):
        fuse_conv_bn([nn.Conv2d(1, 1, 1)])
    with pytest.raises(TypeError, match="TorchScript"):
        inference_copy(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()))
    with pytest.raises(TypeError, match="DataParallel"):
        inference_copy(nn.DataParallel(nn.Conv2d(1, 2, 1)))
    with pytest.raises(TypeError, match="'yes'"):
        inference_copy(nn.Conv2d(1, 2, 1), channels_last="yes")
    with pytest.raises(TypeError, match="int"):
        to_channels_last(3)
    with pytest.raises(ValueError, match="'1'.*track_running_stats=False"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="3 features.*2 channels"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(3)))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_copy_keeps_the_norms_of_the_mil_head(norm):
    net = _m2unet(mil_norm=norm).eval()  # a BatchNorm1d after a Linear is left as it is (no conv to fold into)
    fast = inference_copy(net)
    x = torch.rand(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast.classify(x), net.classify(x), rtol=1e-4, atol=1e-5)
    assert isinstance(fast.emb_fc[1], nn.LayerNorm if norm == "layer" else nn.BatchNorm1d)
