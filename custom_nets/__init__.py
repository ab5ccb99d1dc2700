"""Networks and losses of the COVID-19 chest CT bundles: plain PyTorch/MONAI modules, no file or config logic."""

from __future__ import annotations
