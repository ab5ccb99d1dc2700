"""Where the optional real CT samples live."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REAL_DATA_ENV", "real_data_dir"]

REAL_DATA_ENV = "CHESTCT_REAL_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """``$CHESTCT_REAL_DATA``, else ``../shared/data/real`` beside the repository (may not exist)."""
    return Path(os.environ.get(REAL_DATA_ENV, _REPO_ROOT.parent / "shared" / "data" / "real"))
