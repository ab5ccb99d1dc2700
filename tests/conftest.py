"""Shared test fixtures: where the real CT data lives, and thread limits for the 2-core CI machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chestct.paths import REAL_DATA_ENV, real_data_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real data folder; skips (or fails under ``CI=true``) when it is absent."""
    folder = real_data_dir()
    if not folder.is_dir():
        message = f"real CT data not found at {folder} (set {REAL_DATA_ENV})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder
