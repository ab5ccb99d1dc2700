"""Losses of the two methods: DA-CMIL's instance-to-bag contrastive loss and M2UNet's multi-task loss."""

from __future__ import annotations

from custom_nets.losses.contrastive import DACMILLoss, InstanceBagContrastiveLoss
from custom_nets.losses.multitask import M2UNetLoss

__all__ = ["DACMILLoss", "InstanceBagContrastiveLoss", "M2UNetLoss"]
