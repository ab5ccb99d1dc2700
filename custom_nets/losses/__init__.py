"""Losses of the two methods: DA-CMIL's instance-to-bag contrastive loss and M2UNet's multi-task loss."""

from __future__ import annotations
