"""JSON logging to stderr, one line per event, with the node and the request id.

Owns the log format and its output: structlog for events in general, and `info_line`
for the per-request access line, which skips structlog's processor chain because it
is written for every API request (its cost is measured in bench/request_path_cost.py).
Both render the same way: a flat JSON object with `event`, `level`, `timestamp`,
`node` and, inside a request, `request_id`.

Never pass plaintext, key material, PINs, passwords or secret keys to a logger.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import Any, TextIO

import structlog

# The id of the API request being served, for every line logged while serving it. A plain
# ContextVar rather than structlog.contextvars: setting and resetting one is a fraction of
# a microsecond, and merging it into an event needs no walk over the whole context.
REQUEST_ID: ContextVar[str | None] = ContextVar("kmsd_request_id", default=None)

_node = ""
_process_fields: dict[str, Any] = {}
_min_level = logging.INFO
_configured = False


def _fallback(value: object) -> Any:
    # What structlog's JSONRenderer does with values JSON has no type for.
    try:
        return value.__structlog__()  # type: ignore[attr-defined]
    except AttributeError:
        return repr(value)


def _make_encoder() -> Callable[[Any], str]:
    # json.dumps builds a new C encoder on every call, which costs more than encoding a
    # log line; one encoder built once does the same work. No circular-reference markers:
    # an event is a flat dict of our own. The separators are json.dumps's defaults, so a
    # line looks as it did with structlog's JSONRenderer.
    if c_make_encoder is None:  # an interpreter without the C accelerator
        encoder = json.JSONEncoder(default=_fallback)
        return encoder.encode
    encode = c_make_encoder(None, _fallback, encode_basestring_ascii, None, ": ", ", ",
                            False, False, True)
    return lambda fields: "".join(encode(fields, 0))


_render = _make_encoder()

_second: tuple[int, str] = (-1, "")


def timestamp() -> str:
    """Now in ISO 8601 UTC with microseconds, e.g. 2026-01-01T00:10:00.000123Z.

    The date and time of day are formatted once per second and reused: formatting them
    for every line was a visible share of a request's logging cost.
    """
    global _second
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached = _second
    if cached[0] != seconds:
        cached = _second = (seconds,
                            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{cached[1]}.{nanos // 1000:06d}Z"


class _LineWriter:
    """Writes rendered lines to a text stream; structlog's logger, and info_line's output.

    A line logged on a running event loop is held until that loop's next turn and written
    with the other lines held by then: one write(2) for many requests rather than one each.
    The write was the largest part of a request's logging cost under load (profiled), and
    at high concurrency one loop turn finishes many requests. A line logged with no running
    loop (another thread, start-up) and any error or critical line is written at once,
    after whatever was held so the order is kept; what is held when the process exits is
    written then. A SIGKILL can lose the lines of the current loop turn only.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._held: list[str] = []
        # The loop a flush is scheduled on; None once it ran.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def hold(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.write_now(line)
            return
        with self._lock:
            self._held.append(line)
            if self._flush_on is loop:
                return
            # Also when a flush is scheduled on another loop: that one may never run again.
            self._flush_on = loop
        loop.call_soon(self.flush)

    def write_now(self, line: str) -> None:
        with self._lock:
            self._held.append(line)
            self._write_held()

    def flush(self) -> None:
        with self._lock:
            self._flush_on = None
            if self._held:
                self._write_held()

    def _write_held(self) -> None:
        lines, self._held = self._held, []
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    # structlog calls the method named after the level.
    msg = log = debug = info = warn = warning = hold
    err = error = critical = fatal = failure = exception = write_now


# One writer for the process: loggers structlog has cached keep writing through it when
# configure() points it at another stream.
_out = _LineWriter(sys.stderr)


def flush() -> None:
    """Write the lines held for the end of the current loop turn now."""
    _out.flush()


atexit.register(flush)


class _WriterHandler(logging.Handler):
    """Standard-library records (pysyncobj, aiohttp) go out through the same writer, so
    their lines keep their place among the others."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own convention for a failed format
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            _out.write_now(line)
        else:
            _out.hold(line)


def _add_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]
             ) -> MutableMapping[str, Any]:
    event.setdefault("node", _node)
    for name, value in _process_fields.items():
        event.setdefault(name, value)
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _add_timestamp(_logger: Any, _method: str, event: MutableMapping[str, Any]
                   ) -> MutableMapping[str, Any]:
    event["timestamp"] = timestamp()
    return event


def _render_json(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    return _render(event)


def info_line(fields: dict[str, Any]) -> None:
    """Log one info event given as a flat dict that names its `event` (and `request_id`).

    For the access line written for every API request: it skips structlog's chain (the
    bound-logger proxy, the context merge, five processors), which cost more than the
    line is worth. The line has the fields and format of the lines structlog writes.
    """
    if not _configured:  # a test serving in-process: structlog's defaults
        fields = dict(fields)
        structlog.get_logger("kmsd").info(fields.pop("event"), **fields)
        return
    if _min_level > logging.INFO:
        return
    fields["node"] = _node
    fields.update(_process_fields)
    fields["level"] = "info"
    fields["timestamp"] = timestamp()
    _out.hold(_render(fields))


def configure(node_id: str, level: int = logging.INFO, stream: TextIO | None = None,
              process_fields: dict[str, Any] | None = None) -> None:
    """Log JSON lines of `level` and above to `stream` (stderr); `process_fields` go in every
    line (an API worker's index, say)."""
    global _node, _min_level, _configured, _process_fields
    _out.flush()
    _out.stream = stream if stream is not None else sys.stderr
    _node, _min_level, _configured = node_id, level, True
    _process_fields = dict(process_fields or {})
    shared = [
        structlog.contextvars.merge_contextvars,  # anything else bound with structlog
        _add_ids,
        structlog.processors.add_log_level,
        _add_timestamp,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _render_json],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_args: _out,
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (pysyncobj, aiohttp) end up as JSON too.
    handler = _WriterHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # A library's traceback (asyncio's "Exception in callback") as text, as kmsd's own.
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _render_json],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
