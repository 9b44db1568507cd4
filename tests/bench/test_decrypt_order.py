"""The order in which bench/decrypt.py measures the servers, run after run."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from hypothesis import given
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _decrypt() -> ModuleType:
    bench = os.path.join(REPO, "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module("decrypt")
    finally:
        sys.path.remove(bench)


rotated = _decrypt().rotated


@given(st.lists(st.text(max_size=3), max_size=8, unique=True), st.integers(0, 50))
def test_every_run_measures_every_server_once(names: list[str], rep: int) -> None:
    assert sorted(rotated(names, rep)) == sorted(names)


@given(st.lists(st.text(max_size=3), min_size=1, max_size=8, unique=True), st.integers(0, 50))
def test_over_as_many_runs_as_servers_each_takes_every_place_once(names: list[str],
                                                                   first: int) -> None:
    orders = [rotated(names, rep) for rep in range(first, first + len(names))]
    for place in range(len(names)):
        assert sorted(order[place] for order in orders) == sorted(names)


def test_the_first_run_keeps_the_order_asked_for() -> None:
    assert rotated(["kmsd3", "kmsd1", "moto", "null", "minimal"], 0) == [
        "kmsd3", "kmsd1", "moto", "null", "minimal"]
    assert rotated(["kmsd3", "kmsd1", "moto"], 1) == ["kmsd1", "moto", "kmsd3"]
