"""Tests for kmsd.ids: request and event ids are random version-4 UUID strings, never repeated."""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter

from kmsd import ids


def test_ids_are_version_4_uuids_formatted_like_uuid4() -> None:
    for _ in range(3 * ids._BATCH):  # across refills
        value = ids.new_uuid()
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # lowercase 8-4-4-4-12, as str(uuid.uuid4())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat() -> None:
    drawn = [ids.new_uuid() for _ in range(20 * ids._BATCH)]
    assert len(set(drawn)) == len(drawn)


def test_every_random_bit_varies() -> None:
    # 122 random bits: each hex digit but the version digit takes many values, and the variant
    # digit all four of 8, 9, a, b.
    drawn = [ids.new_uuid().replace("-", "") for _ in range(4 * ids._BATCH)]
    for position in range(32):
        seen = Counter(value[position] for value in drawn)
        if position == 12:
            assert seen.keys() == {"4"}
        elif position == 16:
            assert seen.keys() == set("89ab")
        else:
            assert len(seen) == 16


def test_threads_never_share_an_id() -> None:
    results: list[list[str]] = [[] for _ in range(8)]

    def draw(out: list[str]) -> None:
        out.extend(ids.new_uuid() for _ in range(3 * ids._BATCH))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn = [value for out in results for value in out]
    assert len(set(drawn)) == len(drawn) == 8 * 3 * ids._BATCH


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    ids.new_uuid()  # the pool now holds ids the parent has not used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the ids it gets, then leave at once
        try:
            os.write(write, "\n".join(ids.new_uuid() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    os.waitpid(pid, 0)
    parent = [ids.new_uuid() for _ in range(ids._BATCH)]
    assert len(child) == 4 and not set(child) & set(parent)
