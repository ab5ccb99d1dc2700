"""Networks and losses of the COVID-19 chest CT bundles: plain PyTorch/MONAI modules, no file or config logic."""

from __future__ import annotations

from custom_nets.attention import GatedInstanceAttention, GatedSpatialAttention
from custom_nets.dacmil import DACMIL, DACMIL_BACKBONES, DACMIL_POOLINGS, ResNetFeatures
from custom_nets.gcp import GlobalContrastPooling
from custom_nets.inference import fuse_conv_bn, inference_copy, to_channels_last
from custom_nets.losses import DACMILLoss, InstanceBagContrastiveLoss, M2UNetLoss
from custom_nets.m2unet import M2UNET_TASKS, M2UNet
from custom_nets.resnest import (  # importing registers the encoders in MONAI's FlexibleUNet backbone registry
    RESNEST_VARIANTS,
    ResNeStBottleneck,
    ResNeStEncoder,
    ResNeStUNet,
    SplitAttention2d,
    resnest_output_channels,
)

__all__ = [
    "DACMIL",
    "DACMILLoss",
    "DACMIL_BACKBONES",
    "DACMIL_POOLINGS",
    "GatedInstanceAttention",
    "GatedSpatialAttention",
    "GlobalContrastPooling",
    "InstanceBagContrastiveLoss",
    "M2UNET_TASKS",
    "M2UNet",
    "M2UNetLoss",
    "RESNEST_VARIANTS",
    "ResNeStBottleneck",
    "ResNeStEncoder",
    "ResNeStUNet",
    "ResNetFeatures",
    "SplitAttention2d",
    "fuse_conv_bn",
    "inference_copy",
    "resnest_output_channels",
    "to_channels_last",
]
