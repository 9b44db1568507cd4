"""pysyncobj on the event loop: the poller, the ticker, and a real Raft member run by them."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
from pysyncobj import syncobj as pysyncobj_syncobj
from pysyncobj.poller import POLL_EVENT_TYPE, PollPoller

from cluster import commands, loop_tick
from cluster.raft_node import RaftNode
from cluster.state import KmsState
from tests.unit.cluster.single_member import settings, wait_until

READ, WRITE = POLL_EVENT_TYPE.READ, POLL_EVENT_TYPE.WRITE


async def _turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_the_poller_reports_readiness_through_the_loop_then_the_event_hook() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, int]] = []
        hooks: list[int] = []
        poller = loop_tick.LoopPoller(loop, lambda: hooks.append(len(seen)))
        left, right = socket.socketpair()
        left.setblocking(False)
        try:
            poller.subscribe(left.fileno(), lambda fd, event: seen.append((fd, event)), READ)
            await _turns()
            assert seen == []  # nothing to read yet

            right.send(b"x")
            await _turns()
            assert seen and all(item == (left.fileno(), READ) for item in seen)
            assert hooks and hooks[0] == 1  # the hook runs after the descriptor's callback
            left.recv(16)

            # Interest in writing only while asked for, as pysyncobj asks for it.
            seen.clear()
            poller.subscribe(left.fileno(), lambda fd, event: seen.append((fd, event)),
                             READ | WRITE)
            await _turns()
            assert (left.fileno(), WRITE) in seen
            poller.subscribe(left.fileno(), lambda fd, event: seen.append((fd, event)), READ)
            await _turns()
            seen.clear()
            await _turns()
            assert seen == []

            poller.unsubscribe(left.fileno())
            right.send(b"y")
            await _turns()
            assert seen == []
            poller.poll(0.5)  # the loop waits; poll returns at once
        finally:
            poller.close()
            left.close()
            right.close()

    asyncio.run(scenario())


def test_close_leaves_the_loop_watching_nothing_of_its_own() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        poller = loop_tick.LoopPoller(loop, lambda: None)
        left, right = socket.socketpair()
        try:
            poller.subscribe(left.fileno(), lambda fd, event: None, READ | WRITE)
            poller.close()
            assert not loop.remove_reader(left.fileno())
            assert not loop.remove_writer(left.fileno())
        finally:
            left.close()
            right.close()

    asyncio.run(scenario())


def test_install_lets_the_poller_type_be_a_poller_and_keeps_the_names() -> None:
    loop_tick.install()
    loop_tick.install()  # twice: still one wrapper
    create = pysyncobj_syncobj.createPoller
    assert create.takes_instances
    assert isinstance(create("poll"), PollPoller)
    loop = asyncio.new_event_loop()
    try:
        mine = loop_tick.LoopPoller(loop, lambda: None)
        assert create(mine) is mine
    finally:
        loop.close()


def test_requests_on_one_turn_make_one_tick_and_the_period_makes_more() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []
        ticker = loop_tick.LoopTicker(loop, lambda: ticks.append(loop.time()), period=0.02)
        ticker.request()
        ticker.request()
        ticker.request()
        await _turns()
        assert len(ticks) == 1

        ticker.start()
        await asyncio.sleep(0.25)
        assert len(ticks) >= 6  # ~12 expected; a loaded machine may run fewer
        ticker.stop()
        count = len(ticks)
        ticker.request()
        await asyncio.sleep(0.06)
        assert len(ticks) == count  # stopped: neither the period nor a request ticks

    asyncio.run(scenario())


def test_a_failing_tick_is_logged_and_the_next_one_still_runs(caplog) -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        calls: list[int] = []

        def tick() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")

        ticker = loop_tick.LoopTicker(loop, tick, period=0.01)
        ticker.start()
        await asyncio.sleep(0.1)
        ticker.stop()
        return calls

    with caplog.at_level(logging.ERROR, logger="cluster.loop_tick"):
        calls = asyncio.run(scenario())
    assert len(calls) >= 3
    assert any("raft tick failed" in record.getMessage() for record in caplog.records)


def test_a_member_applies_on_the_loop_thread_and_starts_no_thread(tmp_path) -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        applied_on: list[int] = []
        before = set(threading.enumerate())
        node = RaftNode(settings(tmp_path, 21780), KmsState(),
                        lambda _command, _result: applied_on.append(threading.get_ident()))
        node.start()
        try:
            await wait_until(lambda: node.is_leader, 20, "a single member elects itself")
            for _ in range(5):
                await node.submit(commands.Barrier(), timeout=10)
            assert applied_on and set(applied_on) == {loop_thread}
            assert set(threading.enumerate()) - before == set()
        finally:
            node.stop()

    asyncio.run(scenario())


def test_a_taken_raft_port_fails_the_start_at_once(tmp_path) -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 21781))
            taken.listen()
            node = RaftNode(settings(tmp_path, 21781), KmsState())
            started = time.monotonic()
            with pytest.raises(OSError, match="cannot listen for Raft on 127.0.0.1:21781"):
                node.start()
            assert time.monotonic() - started < 5

    asyncio.run(scenario())


def test_a_socket_closed_before_it_is_unsubscribed_leaves_its_number_reusable() -> None:
    # pysyncobj's TcpConnection.disconnect closes the socket, then unsubscribes it.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        poller = loop_tick.LoopPoller(loop, lambda: None)
        left, right = socket.socketpair()
        number = left.fileno()
        poller.subscribe(number, lambda fd, event: None, READ | WRITE)
        left.close()
        poller.unsubscribe(number)
        right.close()

        seen: list[int] = []
        again, other = socket.socketpair()
        try:
            assert again.fileno() == number  # the lowest free number, as the kernel gives
            poller.subscribe(again.fileno(), lambda fd, event: seen.append(event), READ)
            other.send(b"z")
            await _turns()
            assert READ in seen
        finally:
            poller.close()
            again.close()
            other.close()

    asyncio.run(scenario())
