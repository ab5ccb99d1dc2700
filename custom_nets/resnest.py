"""ResNeSt-style 2D lung segmenter: split-attention blocks, a multi-scale encoder and a U-Net built on FlexibleUNet.

The building blocks follow the ResNeSt paper (Zhang et al. 2020, "ResNeSt: Split-Attention Networks",
arXiv 2004.08955): a feature map is divided into ``groups`` cardinal groups, each into ``radix`` splits; the splits
are summed, globally pooled and passed through two 1x1 convolutions whose output, normalised with a softmax over the
radix dimension ("r-softmax"), weights the splits. The encoder uses the paper's "ResNeSt-D" tweaks: a deep stem of
three 3x3 convolutions instead of one 7x7, strided average pooling instead of strided convolutions inside the block
("avd"), and average pooling before the 1x1 projection of the shortcut ("avg down").

The encoder is registered in MONAI's FlexibleUNet backbone registry under the names in :data:`RESNEST_VARIANTS`
(importing this module registers them), so ``FlexibleUNet(backbone="resnest-small", ...)`` builds the segmenter with
MONAI's own U-Net decoder. :class:`ResNeStUNet` is that FlexibleUNet with defaults sized for the lung mask (fast on a
CPU) and internal padding so that any input size works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, FlexibleUNet
from torch import nn

from custom_nets.checks import check_positive_int

__all__ = [
    "RESNEST_VARIANTS",
    "ResNeStBottleneck",
    "ResNeStEncoder",
    "ResNeStUNet",
    "SplitAttention2d",
    "resnest_output_channels",
]

# The total stride of the encoder: the deep stem, the max pooling and three strided stages each halve the size.
ENCODER_STRIDE = 32

# Named encoder variants, registered with FlexibleUNet. "small" is the default of the lung segmenter: about 0.96 M
# encoder parameters, chosen so that a 256x256 slice runs well within the CPU budget of the lung-mask transform.
# "base" is the ResNeSt-50-D layout of the paper (radix 2, one cardinal group, 64-wide bottlenecks).
RESNEST_VARIANTS: dict[str, dict[str, Any]] = {
    "resnest-tiny": {"layers": (1, 1, 1, 1), "stem_width": 8, "widths": (8, 16, 32, 64)},
    "resnest-small": {"layers": (2, 2, 2, 2), "stem_width": 16, "widths": (16, 32, 64, 128)},
    "resnest-base": {"layers": (3, 4, 6, 3), "stem_width": 32, "widths": (64, 128, 256, 512)},
}


class SplitAttention2d(nn.Module):
    """Split-attention convolution (ResNeSt): ``radix`` convolution splits per cardinal group, weighted by attention.

    One grouped convolution produces all ``radix * channels`` split channels at once (``groups * radix`` convolution
    groups, radix-major order). The splits are summed, globally average pooled and passed through two 1x1
    convolutions (with batch norm and ReLU between them) giving one logit per split and channel; a softmax over the
    radix dimension turns them into weights that sum to 1 for each channel (a sigmoid gate when ``radix == 1``, which
    reduces the block to a squeeze-and-excitation convolution). The output is the weighted sum of the splits.
    As in the paper, the attention MLP is batch-normalised on pooled (1x1) features, so training needs at least
    two samples per batch.

    Args:
        in_channels: number of input channels; divisible by ``groups * radix``.
        channels: number of output channels; divisible by ``groups``.
        kernel_size: size of the split convolutions (odd, so that "same" padding keeps the size at stride 1).
        stride: stride of the split convolutions.
        radix: number of splits per cardinal group.
        groups: number of cardinal groups.
        reduction: the attention bottleneck has ``channels * radix // reduction`` channels.
        min_attention_channels: lower bound for the attention bottleneck width, so narrow layers still get a
            usefully wide attention MLP.
        bias: whether the split convolution has a bias (not needed before batch norm).

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        radix: int = 2,
        groups: int = 1,
        reduction: int = 4,
        min_attention_channels: int = 32,
        bias: bool = False,
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        channels = check_positive_int("channels", channels)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        stride = check_positive_int("stride", stride)
        radix = check_positive_int("radix", radix)
        groups = check_positive_int("groups", groups)
        reduction = check_positive_int("reduction", reduction)
        min_attention_channels = check_positive_int("min_attention_channels", min_attention_channels)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        if in_channels % (groups * radix) != 0:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by groups * radix ({groups} * {radix} = "
                f"{groups * radix})."
            )
        if channels % groups != 0:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}).")
        self.channels = channels
        self.radix = radix
        self.groups = groups

        self.conv = nn.Conv2d(
            in_channels,
            channels * radix,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups * radix,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(channels * radix)
        self.act = nn.ReLU(inplace=True)
        attention_channels = max(channels * radix // reduction, min_attention_channels)
        # the attention MLP is grouped per cardinal group, so its width must split evenly over the groups
        attention_channels = -(-attention_channels // groups) * groups
        self.fc1 = nn.Conv2d(channels, attention_channels, 1, groups=groups)
        self.bn_fc = nn.BatchNorm2d(attention_channels)
        self.fc2 = nn.Conv2d(attention_channels, channels * radix, 1, groups=groups)

    def _splits(self, x: torch.Tensor) -> torch.Tensor:
        """The radix splits ``(B, radix, channels, H', W')`` of the input ``(B, in_channels, H, W)``."""
        x = self.act(self.bn(self.conv(x)))
        return x.reshape(x.shape[0], self.radix, self.channels, x.shape[2], x.shape[3])

    def _attention(self, splits: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, radix, channels, 1, 1)`` of the splits ``(B, radix, channels, H', W')``."""
        batch = splits.shape[0]
        gap = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # (B, channels, 1, 1)
        logits = self.fc2(self.act(self.bn_fc(self.fc1(gap))))  # (B, radix * channels, 1, 1), group-major
        if self.radix == 1:
            return torch.sigmoid(logits).reshape(batch, 1, self.channels, 1, 1)
        # the grouped fc2 emits (group, radix, channel-in-group); the splits are (radix, group, channel-in-group)
        logits = logits.reshape(batch, self.groups, self.radix, self.channels // self.groups)
        weights = torch.softmax(logits, dim=2).transpose(1, 2)
        return weights.reshape(batch, self.radix, self.channels, 1, 1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights that :meth:`forward` applies to the splits of ``x``.

        Args:
            x: input ``(B, in_channels, H, W)``.

        Returns:
            ``(B, radix, channels, 1, 1)``; for ``radix > 1`` they sum to 1 over the radix dimension.
        """
        return self._attention(self._splits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input ``(B, in_channels, H, W)``.

        Returns:
            ``(B, channels, ceil(H / stride), ceil(W / stride))``.
        """
        splits = self._splits(x)
        return (splits * self._attention(splits)).sum(dim=1)


class ResNeStBottleneck(nn.Module):
    """ResNeSt bottleneck block: 1x1 reduce, split-attention 3x3, 1x1 expand, residual shortcut.

    Downsampling follows ResNeSt-D: the split-attention convolution always runs at stride 1 and a 3x3 average
    pooling (stride 2) follows it ("avd"), because a strided 3x3 convolution discards three quarters of the positions
    it computes; the shortcut average-pools before its 1x1 projection ("avg down") instead of a strided 1x1
    convolution that would ignore three quarters of the input.

    Args:
        in_channels: number of input channels.
        width: bottleneck width per cardinal group; the block outputs ``width * expansion`` channels.
        stride: 1 or 2.
        radix: number of splits per cardinal group of the split-attention convolution.
        groups: number of cardinal groups.
        reduction: reduction factor of the split-attention MLP.
        expansion: output channels are ``width * expansion``.

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, width * expansion, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        radix: int = 2,
        groups: int = 1,
        reduction: int = 4,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        width = check_positive_int("width", width)
        expansion = check_positive_int("expansion", expansion)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}.")
        inner = width * groups
        out_channels = width * expansion
        self.out_channels = out_channels

        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.split_attention = SplitAttention2d(
            inner, inner, kernel_size=3, stride=1, radix=radix, groups=groups, reduction=reduction
        )
        self.avd: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # zero-initialised last norm: each residual block starts as the identity, which stabilises early training
        nn.init.zeros_(self.bn3.weight)
        self.act = nn.ReLU(inplace=True)

        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            pool: nn.Module = (
                nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False)
                if stride != 1
                else nn.Identity()
            )
            self.shortcut = nn.Sequential(
                pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input ``(B, in_channels, H, W)``.

        Returns:
            ``(B, width * expansion, ceil(H / stride), ceil(W / stride))``.
        """
        out = self.act(self.bn1(self.conv1(x)))
        out = self.avd(self.split_attention(out))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


def resnest_output_channels(stem_width: int, widths: Sequence[int], expansion: int = 4) -> tuple[int, ...]:
    """Channels of the five feature maps of a :class:`ResNeStEncoder`: the stem, then each of the four stages."""
    return (2 * stem_width, *(w * expansion for w in widths))


class ResNeStEncoder(nn.Module, BaseEncoder):
    """ResNeSt-D style 2D encoder returning five feature maps for a U-Net decoder (a FlexibleUNet backbone).

    Layout: a deep stem (3x3 conv stride 2, two 3x3 convs; ``stem_width``, ``stem_width``, ``2 * stem_width``
    channels), then a 3x3 max pooling (stride 2) and four stages of :class:`ResNeStBottleneck` blocks; stages 2-4
    start with a stride-2 block.

    Args:
        spatial_dims: must be 2 (the argument exists for the FlexibleUNet backbone interface).
        in_channels: number of input channels.
        layers: number of blocks in each of the four stages.
        stem_width: width of the first two stem convolutions; the stem outputs ``2 * stem_width`` channels.
        widths: bottleneck width (per cardinal group) of each stage; stage ``i`` outputs ``widths[i] * expansion``.
        radix: number of splits of the split-attention convolutions.
        groups: number of cardinal groups.
        reduction: reduction factor of the split-attention MLP.
        expansion: expansion of the bottleneck blocks.
        pretrained: must be False: there are no pretrained weights (the argument exists for the FlexibleUNet
            backbone interface).

    Shapes:
        input ``(B, in_channels, H, W)``; output a list of five maps, map ``i`` of shape
        ``(B, resnest_output_channels(...)[i], ceil(H / 2 ** (i + 1)), ceil(W / 2 ** (i + 1)))``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        layers: Sequence[int] = RESNEST_VARIANTS["resnest-small"]["layers"],
        stem_width: int = RESNEST_VARIANTS["resnest-small"]["stem_width"],
        widths: Sequence[int] = RESNEST_VARIANTS["resnest-small"]["widths"],
        radix: int = 2,
        groups: int = 1,
        reduction: int = 4,
        expansion: int = 4,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"ResNeStEncoder is 2D only, got spatial_dims={spatial_dims!r}.")
        if pretrained:
            raise ValueError(f"no pretrained ResNeStEncoder weights are available, got pretrained={pretrained!r}.")
        in_channels = check_positive_int("in_channels", in_channels)
        stem_width = check_positive_int("stem_width", stem_width)
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}.")
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be four positive widths, got {widths!r}.")
        for w in widths:
            if w % radix != 0:
                raise ValueError(f"each width must be divisible by radix ({radix}), got widths={tuple(widths)!r}.")
        self.out_channels = resnest_output_channels(stem_width, widths, expansion)

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(
            *conv_bn_relu(in_channels, stem_width, 2),
            *conv_bn_relu(stem_width, stem_width, 1),
            *conv_bn_relu(stem_width, 2 * stem_width, 1),
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        cin = 2 * stem_width
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                block = ResNeStBottleneck(cin, width, stride, radix, groups, reduction, expansion)
                blocks.append(block)
                cin = block.out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        for m in self.modules():
            # He init for the feature convolutions (those feeding batch norm, hence without bias); the attention
            # MLP keeps PyTorch's default so its initial logits stay small and the splits start equally weighted
            if isinstance(m, nn.Conv2d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            x: input ``(B, in_channels, H, W)``.

        Returns:
            five feature maps at strides 2, 4, 8, 16, 32 (see the class docstring for their shapes).
        """
        x = self.stem(x)
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    # FlexibleUNet backbone interface: one entry per named variant, in the order of RESNEST_VARIANTS.
    @classmethod
    def get_encoder_names(cls) -> list[str]:
        """Names under which the variants are registered in FlexibleUNet's backbone registry."""
        return list(RESNEST_VARIANTS)

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        """Constructor arguments of each variant (FlexibleUNet overrides spatial_dims, in_channels, pretrained)."""
        return [{"spatial_dims": 2, "in_channels": 1, "pretrained": False, **v} for v in RESNEST_VARIANTS.values()]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        """Channels of the five feature maps of each variant."""
        return [resnest_output_channels(v["stem_width"], v["widths"]) for v in RESNEST_VARIANTS.values()]

    @classmethod
    def num_outputs(cls) -> list[int]:
        """Every variant returns five feature maps."""
        return [5] * len(RESNEST_VARIANTS)


FLEXUNET_BACKBONE.register_class(ResNeStEncoder)


class ResNeStUNet(FlexibleUNet):
    """Lung segmenter: MONAI's FlexibleUNet with a registered ResNeSt encoder, padding inputs of any size.

    The decoder is FlexibleUNet's: at each scale, nearest-neighbour upsampling (after a 1x1 convolution that halves the
    channels), concatenation with the encoder map of that scale and two 3x3 conv/norm/ReLU blocks; a final block
    returns to full resolution and a 3x3 convolution gives the class logits. The input is padded (replicating its
    border) to a multiple of 32 and the logits cropped back, so any ``H, W`` works. Training needs at least two
    samples per batch (batch norm on the pooled features of the split attention).

    Args:
        in_channels: number of input channels.
        out_channels: number of classes (background, right lung, left lung by default).
        backbone: a name from :data:`RESNEST_VARIANTS` (or any FlexibleUNet backbone).
        decoder_channels: output channels of the five decoder blocks, deepest first. The defaults are narrow because
            the full-resolution decoder blocks dominate the CPU time of a small encoder; 8 channels at full
            resolution (instead of 16) save 15 % of the time but made training on a toy task markedly less stable.
        norm: normalisation of the decoder blocks.
        act: activation of the decoder blocks.
        dropout: dropout of the decoder blocks.

    Shapes:
        input ``(B, in_channels, H, W)``; output logits ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        backbone: str = "resnest-small",
        decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float | tuple = 0.0,
    ) -> None:
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        if backbone not in FLEXUNET_BACKBONE.register_dict:
            raise ValueError(f"unknown backbone {backbone!r}, expected one of {sorted(RESNEST_VARIANTS)}.")
        if len(decoder_channels) != 5 or any(not isinstance(c, int) or c < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be five positive channel counts, got {decoder_channels!r}.")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone=backbone,
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=2,
            norm=norm,
            act=act,
            dropout=dropout,
            upsample="nontrainable",
            interp_mode="nearest",
            # forward pads to a multiple of the encoder stride, so the decoder never needs its own padding
            is_pad=False,
        )
        # an attribute rather than the module constant, which TorchScript cannot read
        self.encoder_stride = ENCODER_STRIDE

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """
        Args:
            inputs: ``(B, in_channels, H, W)``, any ``H, W``.

        Returns:
            logits ``(B, out_channels, H, W)``.
        """
        height, width = inputs.shape[-2], inputs.shape[-1]
        pad_h = (self.encoder_stride - height % self.encoder_stride) % self.encoder_stride
        pad_w = (self.encoder_stride - width % self.encoder_stride) % self.encoder_stride
        x = inputs
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")
        # FlexibleUNet.forward inlined: TorchScript cannot compile super() calls
        x = self.segmentation_head(self.decoder(self.encoder(x), self.skip_connect))
        return x[:, :, :height, :width]
