"""In-plane mask helpers, checked on small hand-drawn arrays."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.masks import (
    bounding_box,
    close_in_plane,
    disk,
    fill_holes_in_plane,
    keep_largest_component,
    label_in_plane,
    open_in_plane,
)


def _ring(size: int = 9, depth: int = 3) -> np.ndarray:
    mask = np.zeros((size, size, depth), dtype=bool)
    mask[2:7, 2:7] = True
    mask[3:6, 3:6] = False  # a 3x3 hole in every slice
    return mask


def test_fill_holes_fills_every_slice_including_the_first_and_last() -> None:
    filled = fill_holes_in_plane(_ring())
    assert filled[2:7, 2:7].all() and filled.sum() == 25 * 3


def test_fill_holes_leaves_open_notches() -> None:
    notch = _ring()
    notch[4, 2:4] = False  # the hole opens to the outside in x
    notch[4, 0:2] = False
    assert not fill_holes_in_plane(notch)[4, 3].any()


def test_fill_holes_does_not_connect_slices() -> None:
    mask = _ring()
    mask[:, :, 1] = False  # a hole in slice 0 and 2 only; slice 1 empty
    filled = fill_holes_in_plane(mask)
    assert not filled[:, :, 1].any() and filled[4, 4, 0] and filled[4, 4, 2]


def test_label_in_plane_numbers_slices_separately() -> None:
    mask = np.zeros((5, 5, 2), dtype=bool)
    mask[1:3, 1:3, :] = True  # the same square in two slices: two 2D components
    labels, count = label_in_plane(mask)
    assert count == 2 and labels[1, 1, 0] != labels[1, 1, 1]


def test_open_removes_thin_bridges_and_close_fills_thin_gaps() -> None:
    mask = np.zeros((20, 9, 1), dtype=bool)
    mask[1:8, 1:8] = mask[12:19, 1:8] = True
    mask[8:12, 4] = True  # a one-pixel bridge
    opened = open_in_plane(mask, 1)
    assert not opened[8:12].any() and opened[2:7, 2:7].all()
    gap = np.zeros((17, 9, 1), dtype=bool)
    gap[1:8, 1:8] = gap[9:16, 1:8] = True  # two blocks one row apart
    closed = close_in_plane(gap, 1)
    assert closed[8, 1:8].all() and not closed[0].any()
    assert close_in_plane(mask, 0).sum() == mask.sum() == open_in_plane(mask, 0).sum()


def test_close_does_not_shrink_at_the_border() -> None:
    full = np.ones((6, 6, 2), dtype=bool)
    assert close_in_plane(full, 2).all()


def test_keep_largest_and_bounding_box() -> None:
    mask = np.zeros((10, 10, 4), dtype=bool)
    mask[0:2, 0:2, 0] = True
    mask[4:9, 5:7, 1:3] = True
    largest = keep_largest_component(mask)
    assert largest.sum() == 20 and not largest[0, 0, 0]
    start, end = bounding_box(largest)
    assert start.tolist() == [4, 5, 1] and end.tolist() == [9, 7, 3]
    assert bounding_box(np.zeros((3, 3, 3), dtype=bool)) is None
    assert not keep_largest_component(np.zeros((3, 3, 3), dtype=bool)).any()


def test_disk() -> None:
    assert disk(0).shape == (1, 1, 1) and disk(0).all()
    assert disk(2).shape == (5, 5, 1) and disk(2).sum() == 13
    with pytest.raises(ValueError, match="-1"):
        disk(-1)
