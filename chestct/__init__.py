"""COVID-19 chest CT pipeline: loading in HU, preprocessing, lung masks, bags, engines, writers and data tools."""

from __future__ import annotations

__version__ = "0.1.0"
