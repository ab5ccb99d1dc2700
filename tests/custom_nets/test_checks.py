"""Tests of the shared argument validators."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from custom_nets.checks import check_in_range, check_positive_int

POSITIVE_INT_ACCEPTED = [
    (1, 1),
    (7, 7),
    (10**12, 10**12),
    (np.int64(3), 3),
    (np.int32(1), 1),
    (np.uint8(255), 255),
]

POSITIVE_INT_REJECTED = [
    0,
    -1,
    np.int64(0),
    True,
    False,
    np.True_,
    2.0,
    2.5,
    np.float64(3.0),
    float("nan"),
    "3",
    None,
    torch.tensor(3),
    (3,),
]


@pytest.mark.parametrize("value, expected", POSITIVE_INT_ACCEPTED)
def test_positive_int_accepts(value, expected):
    result = check_positive_int("size", value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("value", POSITIVE_INT_REJECTED)
def test_positive_int_rejects(value):
    with pytest.raises(ValueError) as info:
        check_positive_int("num_instances", value)
    message = str(info.value)
    assert "num_instances" in message
    assert repr(value) in message
    assert message == f"num_instances must be a positive integer, got {value!r}."


# (value, low, high, low_open, high_open, expected)
IN_RANGE_ACCEPTED = [
    (0.0, 0.0, 1.0, False, False, 0.0),
    (1.0, 0.0, 1.0, False, False, 1.0),
    (0, 0.0, 1.0, False, False, 0.0),
    (1, 0.0, 1.0, False, False, 1.0),
    (0.25, 0.0, 1.0, False, False, 0.25),
    (0.5, 0.0, 1.0, True, True, 0.5),
    (1e-9, 0.0, 1.0, True, True, 1e-9),
    (1.0, 0.0, 1.0, True, False, 1.0),
    (0.0, 0.0, 1.0, False, True, 0.0),
    (math.pi, 0.0, math.pi, False, False, math.pi),
    (-2.0, -3.0, -1.0, False, False, -2.0),
    (np.float32(0.5), 0.0, 1.0, False, False, 0.5),
    (np.float64(0.75), 0.0, 1.0, False, False, 0.75),
    (np.int64(1), 0.0, 1.0, False, False, 1.0),
    (Fraction(1, 4), 0.0, 1.0, False, False, 0.25),
]


@pytest.mark.parametrize("value, low, high, low_open, high_open, expected", IN_RANGE_ACCEPTED)
def test_in_range_accepts(value, low, high, low_open, high_open, expected):
    result = check_in_range("prob", value, low, high, low_open=low_open, high_open=high_open)
    assert result == pytest.approx(expected)
    assert type(result) is float


# (value, low, high, low_open, high_open, interval in the message)
IN_RANGE_REJECTED = [
    (1.5, 0.0, 1.0, False, False, "[0, 1]"),
    (-0.1, 0.0, 1.0, False, False, "[0, 1]"),
    (-1, 0.0, 1.0, False, False, "[0, 1]"),
    (float("inf"), 0.0, 1.0, False, False, "[0, 1]"),
    (float("-inf"), 0.0, 1.0, False, False, "[0, 1]"),
    (0.0, 0.0, 1.0, True, True, "(0, 1)"),
    (1.0, 0.0, 1.0, True, True, "(0, 1)"),
    (0, 0.0, 1.0, True, False, "(0, 1]"),
    (1.0, 0.0, 1.0, False, True, "[0, 1)"),
    (0.6, 0.0, 0.5, False, False, "[0, 0.5]"),
    (4.0, 0.0, math.pi, False, False, f"[0, {math.pi!r}]"),
    (float("nan"), 0.0, 1.0, False, False, "[0, 1]"),
    (np.float64("nan"), 0.0, 1.0, True, True, "(0, 1)"),
    (True, 0.0, 1.0, False, False, "[0, 1]"),
    (False, 0.0, 1.0, False, False, "[0, 1]"),
    (np.True_, 0.0, 1.0, False, False, "[0, 1]"),
    ("0.5", 0.0, 1.0, False, False, "[0, 1]"),
    (None, 0.0, 1.0, False, False, "[0, 1]"),
    (1j, 0.0, 1.0, False, False, "[0, 1]"),
    (torch.tensor(0.5), 0.0, 1.0, False, False, "[0, 1]"),
    ([0.5], 0.0, 1.0, False, False, "[0, 1]"),
]


@pytest.mark.parametrize("value, low, high, low_open, high_open, interval", IN_RANGE_REJECTED)
def test_in_range_rejects(value, low, high, low_open, high_open, interval):
    with pytest.raises(ValueError) as info:
        check_in_range("target_fraction", value, low, high, low_open=low_open, high_open=high_open)
    message = str(info.value)
    assert "target_fraction" in message
    assert repr(value) in message
    assert message == f"target_fraction must be in {interval}, got {value!r}."


def test_messages_work_with_pytest_match():
    """Callers' tests match on the bad value; the message must carry it verbatim."""
    with pytest.raises(ValueError, match=re.escape("scale_range must be in [0, 0.5], got 0.9.")):
        check_in_range("scale_range", 0.9, 0.0, 0.5)
    with pytest.raises(ValueError, match=re.escape("in_features must be a positive integer, got 4.5.")):
        check_positive_int("in_features", 4.5)
