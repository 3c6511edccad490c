"""The search benchmark's reading of its curves: forward tokens needed to reach a reward."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is a folder, not a package

from benchmarks.bench_search import tokens_to_reach  # noqa: E402


def test_tokens_to_reach_interpolates_between_budgets():
    curve = [(100.0, 0.2), (300.0, 0.6), (200.0, 0.4)]
    assert tokens_to_reach(curve, 0.5) == pytest.approx(250.0)
    assert tokens_to_reach(curve, 0.1) == 100.0  # the smallest budget already reaches it
    assert tokens_to_reach(curve, 0.6) == pytest.approx(300.0)
    assert tokens_to_reach(curve, 0.7) is None
