"""Tests of the ResNeSt-style lung segmenter: split attention, encoder, U-Net, TorchScript, learning."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from custom_nets.resnest import (
    RESNEST_VARIANTS,
    ResNeStBottleneck,
    ResNeStEncoder,
    ResNeStUNet,
    SplitAttention2d,
    resnest_output_channels,
)

# (in_channels, channels, radix, groups, stride, input H, W)
SPLIT_ATTENTION_CASES = [
    (8, 8, 1, 1, 1, (9, 12)),
    (16, 32, 2, 1, 1, (16, 16)),
    (16, 16, 2, 2, 2, (15, 16)),
    (32, 32, 4, 1, 2, (8, 10)),
    (32, 16, 4, 2, 1, (7, 7)),
]


@pytest.mark.parametrize("in_channels, channels, radix, groups, stride, size", SPLIT_ATTENTION_CASES)
def test_split_attention_shape(in_channels, channels, radix, groups, stride, size):
    block = SplitAttention2d(in_channels, channels, stride=stride, radix=radix, groups=groups)
    x = torch.randn(2, in_channels, *size)
    out = block(x)
    expected = (2, channels, -(-size[0] // stride), -(-size[1] // stride))
    assert out.shape == expected
    assert block.attention_weights(x).shape == (2, radix, channels, 1, 1)


@pytest.mark.parametrize("radix, groups", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_split_attention_weights_sum_to_one(radix, groups):
    block = SplitAttention2d(16, 16, radix=radix, groups=groups).eval()
    with torch.no_grad():
        # large attention weights make the logits differ across splits, so the softmax is not trivially uniform
        block.fc2.weight.normal_(0.0, 3.0)
        weights = block.attention_weights(torch.randn(3, 16, 8, 8))
    assert torch.allclose(weights.sum(dim=1), torch.ones(3, 16, 1, 1), atol=1e-5)
    assert (weights > 0).all() and weights.std() > 1e-3


def test_split_attention_radix_one_is_a_sigmoid_gate():
    block = SplitAttention2d(8, 8, radix=1).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        weights = block.attention_weights(x)
        splits = block._splits(x)
        out = block(x)
    assert ((weights > 0) & (weights < 1)).all()
    assert torch.allclose(out, splits[:, 0] * weights[:, 0], atol=1e-6)


def test_split_attention_is_weighted_sum_of_splits():
    block = SplitAttention2d(16, 8, radix=2, groups=2).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        splits, weights = block._splits(x), block.attention_weights(x)
        expected = splits[:, 0] * weights[:, 0] + splits[:, 1] * weights[:, 1]
        assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize("in_channels, width, stride, size", [(32, 8, 1, (16, 16)), (32, 16, 2, (17, 16))])
def test_bottleneck_shape(in_channels, width, stride, size):
    block = ResNeStBottleneck(in_channels, width, stride=stride)
    out = block(torch.randn(2, in_channels, *size))
    assert out.shape == (2, width * 4, -(-size[0] // stride), -(-size[1] // stride))


@pytest.mark.parametrize("variant", sorted(set(RESNEST_VARIANTS) - {"resnest-base"}))
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (70, 50)])
def test_encoder_feature_shapes(variant, size):
    params = RESNEST_VARIANTS[variant]
    encoder = ResNeStEncoder(in_channels=2, **params)
    features = encoder(torch.randn(2, 2, *size))
    channels = resnest_output_channels(params["stem_width"], params["widths"])
    assert len(features) == 5
    for i, (feature, c) in enumerate(zip(features, channels)):
        stride = 2 ** (i + 1)
        assert feature.shape == (2, c, -(-size[0] // stride), -(-size[1] // stride))


def test_encoder_registered_with_flexible_unet():
    for name, params in RESNEST_VARIANTS.items():
        entry = FLEXUNET_BACKBONE.register_dict[name]
        assert entry["type"] is ResNeStEncoder
        assert entry["feature_channel"] == resnest_output_channels(params["stem_width"], params["widths"])
    net = FlexibleUNet(in_channels=1, out_channels=3, backbone="resnest-tiny", decoder_channels=(32, 16, 8, 8, 8))
    net.eval()  # batch norm in the attention MLP needs more than one sample per batch in training mode
    assert isinstance(net.encoder, ResNeStEncoder)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "batch, size, backbone",
    [
        (2, (64, 64), "resnest-small"),
        (2, (96, 128), "resnest-small"),
        (1, (256, 256), "resnest-small"),
        (2, (50, 70), "resnest-tiny"),
        (1, (64, 96), "resnest-tiny"),
    ],
)
def test_unet_output_shape(batch, size, backbone):
    net = ResNeStUNet(in_channels=1, out_channels=3, backbone=backbone).eval()
    with torch.no_grad():
        out = net(torch.randn(batch, 1, *size))
    assert out.shape == (batch, 3, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (SplitAttention2d, {"in_channels": 16, "channels": 16, "radix": 0}, "radix"),
        (SplitAttention2d, {"in_channels": 6, "channels": 8, "radix": 4}, "6"),
        (SplitAttention2d, {"in_channels": 8, "channels": 9, "groups": 2, "radix": 2}, "9"),
        (SplitAttention2d, {"in_channels": 8, "channels": 8, "kernel_size": 2}, "kernel_size"),
        (ResNeStBottleneck, {"in_channels": 8, "width": 8, "stride": 3}, "3"),
        (ResNeStBottleneck, {"in_channels": 8, "width": 0}, "width"),
        (ResNeStEncoder, {"spatial_dims": 3}, "spatial_dims=3"),
        (ResNeStEncoder, {"pretrained": True}, "pretrained=True"),
        (ResNeStEncoder, {"layers": (2, 2, 2)}, "(2, 2, 2)"),
        (ResNeStEncoder, {"widths": (8, 16, 31, 64)}, "31"),
        (ResNeStEncoder, {"in_channels": 0}, "in_channels"),
        (ResNeStUNet, {"backbone": "resnest-huge"}, "resnest-huge"),
        (ResNeStUNet, {"decoder_channels": (64, 32, 16, 8)}, "(64, 32, 16, 8)"),
        (ResNeStUNet, {"out_channels": 0}, "out_channels"),
    ],
)
def test_ill_arguments(factory, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        factory(**kwargs)


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("backbone", ["resnest-tiny", "resnest-small"])
def test_torchscript_round_trip(tmp_path, backbone):
    net = ResNeStUNet(backbone=backbone).eval()
    x = torch.randn(2, 1, 64, 80)
    with torch.no_grad():
        expected = net(x)
    scripted = torch.jit.script(net)
    path = tmp_path / "net.ts"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        # a different, non-multiple-of-32 size also works after export (the padding is scripted, not traced)
        assert loaded(torch.randn(1, 1, 50, 70)).shape == (1, 3, 50, 70)


def test_gradients_flow():
    net = ResNeStUNet(backbone="resnest-tiny").train()
    x = torch.randn(2, 1, 64, 64, requires_grad=True)
    net(x).square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert net.encoder.stem[0].weight.grad.abs().sum() > 0
    # the residual branches start at zero (zero-initialised last norm) but their scale learns from the first step
    assert all(b.bn3.weight.grad.abs().sum() > 0 for stage in net.encoder.stages for b in stage)


def _synthetic_lungs(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images: a bright disk (body) with two dark ellipses (lungs); labels 0 / 1 right lung / 2 left lung."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    images, labels = [], []
    for shift, scale in ((0.0, 1.0), (0.04, 0.85)):
        body = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.45**2
        # the patient's right lung is on the image's left in radiological convention
        right = ((xx - 0.32 - shift) / (0.12 * scale)) ** 2 + ((yy - 0.5) / 0.25) ** 2 < 1
        left = ((xx - 0.68 + shift) / (0.11 * scale)) ** 2 + ((yy - 0.52) / 0.24) ** 2 < 1
        image = np.where(body, 0.8, 0.0) - 0.6 * (right | left)
        label = np.zeros((size, size), np.int64)
        label[right], label[left] = 1, 2
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)[:, None]).float(), torch.from_numpy(np.stack(labels)[:, None])


def _dice(pred: torch.Tensor, label: torch.Tensor, cls: int) -> float:
    p, g = pred == cls, label == cls
    return float(2 * (p & g).sum() / (p.sum() + g.sum()))


@pytest.mark.slow
def test_overfits_two_synthetic_images():
    torch.manual_seed(0)
    images, labels = _synthetic_lungs()
    net = ResNeStUNet(backbone="resnest-small")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    # one thread: these small kernels gain nothing from two, and on a shared CI machine two spinning OpenMP
    # threads made this test ten times slower (~8 s with one thread, minutes with two under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        net.train()
        for _ in range(60):
            optimizer.zero_grad()
            loss_fn(net(images), labels).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            pred = net(images).argmax(dim=1, keepdim=True)
    finally:
        torch.set_num_threads(threads)
    dice = [_dice(pred, labels, c) for c in (1, 2)]
    assert min(dice) > 0.9, (dice, time.perf_counter() - start)
