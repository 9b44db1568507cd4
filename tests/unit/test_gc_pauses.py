"""kmsd.gc_pauses: the lasting heap frozen out of collections, every pause measured."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kmsd import gc_pauses


@pytest.fixture
def thawed() -> Iterator[None]:
    """The test process's heap unfrozen again afterwards, whatever the test froze."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def test_a_full_collection_skips_what_was_frozen_and_still_collects_what_came_after(
        thawed: None) -> None:
    lasting = [[n] for n in range(50_000)]  # lists: always tracked by the collector
    garbage_before = Node()
    garbage_before.peer = garbage_before  # a cycle: only a collection frees it
    del garbage_before
    frozen = gc_pauses.freeze_heap()
    # The collection it ran first freed the cycle instead of freezing it.
    assert not any(type(o) is Node for o in gc.get_objects())
    assert frozen >= len(lasting) and gc.get_freeze_count() == frozen
    assert not gc.get_objects(generation=2)  # a full collection has nothing of it to walk

    cycle = Node()
    cycle.peer = cycle
    del cycle
    assert gc.collect() >= 1  # the cycle made after the freeze is found and freed
    assert gc.get_freeze_count() == frozen


def test_every_collection_is_timed_with_its_generation() -> None:
    pauses = gc_pauses.GcPauses((0.0, 10.0))
    pauses.install()
    pauses.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    rows = pauses.copy()
    gc.collect(1)
    gc.collect(2)
    assert pauses.copy() == rows  # uninstalled: nothing more counted
    assert pauses._callback not in gc.callbacks
    # [<= 0 s, <= 10 s, more, sum of seconds]: every pause lands in the middle bucket. (The
    # test's own allocations may set off a young collection of their own: at least, then.)
    assert rows["0"][1] >= 1 and rows["2"][1] >= 2
    assert all(row[0] == 0 and row[2] == 0 for row in rows.values())
    assert rows["2"][3] > 0
