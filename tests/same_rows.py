"""Comparing mined rows of two runs: what batching may move, and what it never may."""

from __future__ import annotations

import pytest

# The column that moves with batching by float noise (about 1e-7): images of one padded size share a
# MaskFormer forward, so objectness depends on an image's batch partner (see ovseg_ray.mining.matching).
# Scores, margins and areas come from per-image forwards on the same masks: they must match exactly.
NOISY = ("objectness",)


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same rows in the same order: every column exact, objectness to 1e-5."""
    assert len(got) == len(want), (len(got), len(want))
    for index, (row, expected) in enumerate(zip(got, want)):
        assert row.keys() == expected.keys()
        exact = {k: v for k, v in row.items() if k not in NOISY}
        assert exact == {k: v for k, v in expected.items() if k not in NOISY}, index
        for name in NOISY:
            if name in row and (row[name] is None or expected[name] is None):
                assert row[name] == expected[name], (index, name)
            elif name in row:
                assert row[name] == pytest.approx(expected[name], abs=1e-5), (index, name)
