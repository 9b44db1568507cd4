"""The log format and its output: the access line, the request id, when lines are written."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from kmsd import log_setup

ACCESS = {"event": "request", "operation": "Decrypt", "outcome": "ok", "status": 200,
          "principal": "arn:aws:iam::111122223333:root", "keys": ["k-1"], "ms": 1.25,
          "source_ip": "127.0.0.1", "request_id": "r-1"}


@pytest.fixture(autouse=True)
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() changes process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for name in ("_node", "_min_level", "_configured"):
        monkeypatch.setattr(log_setup, name, getattr(log_setup, name))
    monkeypatch.setattr(log_setup._out, "stream", log_setup._out.stream)
    yield
    log_setup.flush()
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log_setup.configure("node-7", stream=stream)
    yield stream
    log_setup.flush()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_access_line_is_one_json_object_with_the_node_level_and_time(out) -> None:
    before = datetime.now(UTC)
    log_setup.info_line(dict(ACCESS))
    [line] = lines(out)
    assert {k: line[k] for k in ACCESS} == ACCESS
    assert (line["node"], line["level"]) == ("node-7", "info")
    stamp = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_the_access_line_renders_hostile_text_as_json(out) -> None:
    target = 'Trent"Service\\\n\u2028\udcff{'
    log_setup.info_line({**ACCESS, "operation": target, "principal": None, "keys": []})
    [line] = lines(out)
    assert (line["operation"], line["principal"], line["keys"]) == (target, None, [])


def test_timestamps_keep_their_microseconds_within_a_second() -> None:
    stamps = [log_setup.timestamp() for _ in range(200)]
    assert all(len(s) == len("2026-01-01T00:00:00.000000Z") and s.endswith("Z")
               for s in stamps)
    assert len(set(stamps)) > 1 and stamps == sorted(stamps)


def test_below_the_configured_level_the_access_line_is_not_written() -> None:
    stream = io.StringIO()
    log_setup.configure("node-7", level=logging.WARNING, stream=stream)
    log_setup.info_line(dict(ACCESS))
    structlog.get_logger("t").warning("kept")
    assert [line["event"] for line in lines(stream)] == ["kept"]


def test_events_logged_while_serving_carry_the_request_id(out) -> None:
    log = structlog.get_logger("t")
    token = log_setup.REQUEST_ID.set("r-42")
    try:
        log.error("request_failed", exc_type="ValueError")
    finally:
        log_setup.REQUEST_ID.reset(token)
    log.warning("later")
    first, second = lines(out)
    assert (first["request_id"], first["node"], first["level"]) == ("r-42", "node-7", "error")
    assert "request_id" not in second and second["node"] == "node-7"


def test_lines_of_one_loop_turn_are_written_together_when_it_ends(out) -> None:
    async def serve() -> tuple[str, str]:
        log_setup.info_line({**ACCESS, "request_id": "a"})
        structlog.get_logger("t").info("other")
        log_setup.info_line({**ACCESS, "request_id": "b"})
        during = out.getvalue()
        await asyncio.sleep(0)
        return during, out.getvalue()

    during, after = asyncio.run(serve())
    assert during == ""
    assert [line.get("request_id", line["event"]) for line in lines(out)] == ["a", "other", "b"]


def test_an_error_is_written_at_once_after_the_lines_held_before_it(out) -> None:
    async def serve() -> None:
        log_setup.info_line({**ACCESS, "request_id": "a"})
        structlog.get_logger("t").error("boom")
        assert [line["event"] for line in lines(out)] == ["request", "boom"]

    asyncio.run(serve())


def test_without_a_running_loop_a_line_is_written_at_once(out) -> None:
    thread = threading.Thread(target=log_setup.info_line, args=(dict(ACCESS),))
    thread.start()
    thread.join()
    assert len(lines(out)) == 1
    logging.getLogger("pysyncobj").warning("from a library")
    assert lines(out)[-1]["event"] == "from a library"
    assert lines(out)[-1]["node"] == "node-7"


def test_a_flush_left_on_a_loop_that_never_ran_again_does_not_strand_later_lines(out) -> None:
    abandoned = asyncio.new_event_loop()

    async def log_one(request_id: str) -> None:
        log_setup.info_line({**ACCESS, "request_id": request_id})

    async def log_and_stop() -> None:
        asyncio.get_running_loop().stop()  # this turn is its last: the flush never runs
        await log_one("first")

    abandoned.run_until_complete(log_and_stop())
    abandoned.close()
    assert out.getvalue() == ""

    async def next_loop() -> None:
        await log_one("second")
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert [line["request_id"] for line in lines(out)] == ["first", "second"]


def test_lines_still_held_at_exit_are_written(tmp_path) -> None:
    script = (
        "import asyncio, os\n"
        "from kmsd import log_setup\n"
        "log_setup.configure('node-1')\n"
        "loop = asyncio.new_event_loop()\n"
        "async def one():\n"
        "    asyncio.get_running_loop().stop()\n"
        "    log_setup.info_line({'event': 'request', 'request_id': 'last'})\n"
        "loop.run_until_complete(one())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60,
                            check=True)
    assert [json.loads(line)["request_id"] for line in result.stderr.splitlines()] == ["last"]


def test_a_library_error_with_a_traceback_carries_the_traceback_as_text(out) -> None:
    try:
        raise OSError(9, "Bad file descriptor")
    except OSError:
        logging.getLogger("asyncio").exception("Exception in callback")
    line = lines(out)[-1]
    assert line["event"] == "Exception in callback"
    assert line["level"] == "error"
    assert "exc_info" not in line
    assert "Traceback (most recent call last)" in line["exception"]
    assert "OSError: [Errno 9] Bad file descriptor" in line["exception"]
