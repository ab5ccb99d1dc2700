"""The project's one input error type."""

from __future__ import annotations

from pathlib import Path


class ChestCTInputError(ValueError):
    """A scan or setting the pipeline cannot use, with the offending path and the reason.

    Args:
        path: the file or folder that was read (``None`` when the input was an in-memory array).
        reason: what is wrong, in words a radiology researcher can act on.
    """

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)
