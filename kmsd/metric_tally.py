"""The per-request metrics (requests and HSM calls) as plain counts, cheap on the request path
and mergeable across a node's processes.

prometheus_client's labelled Counter and Histogram take a lock, validate and walk their
buckets in Python on every observation; here an observation is a dict lookup, a bisect and
two additions. An API worker keeps its own tallies and sends what it gathered to the
primary now and then (and before it answers a fence, so a scrape that fences first sees
every request answered before it), where `merge` adds them in. A worker that dies takes
at most its last half second of counts with it. The families are built only at scrape
time, and render as the labelled prometheus_client metrics would.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# One row per label tuple: a count per bucket (the last one past every bound: +Inf), then
# the sum of the values.
Row = list[float]


def empty_row(bounds: tuple[float, ...]) -> Row:
    return [0] * (len(bounds) + 1) + [0.0]


def add_to_row(row: Row, bounds: tuple[float, ...], value: float) -> None:
    row[bisect_left(bounds, value)] += 1  # le: a value on a bound counts in it
    row[-1] += value


class Histograms:
    """Histogram rows by label tuple. Observed on the event loop, but an HSM call can end on
    another thread: a lock keeps the read-modify-writes whole."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.rows: dict[tuple[Any, ...], Row] = {}
        self._lock = threading.Lock()

    def observe(self, labels: tuple[Any, ...], value: float) -> None:
        with self._lock:
            row = self.rows.get(labels)
            if row is None:
                row = self.rows[labels] = empty_row(self.bounds)
            add_to_row(row, self.bounds, value)

    def take(self) -> dict[tuple[Any, ...], Row]:
        """The rows so far, and start again from none."""
        with self._lock:
            rows, self.rows = self.rows, {}
        return rows

    def check(self, rows: dict[tuple[Any, ...], Row]) -> None:
        """ValueError unless every row has this histogram's buckets (and the sum)."""
        width = len(self.bounds) + 2
        if any(len(row) != width for row in rows.values()):
            raise ValueError("a histogram row of another width")

    def merge(self, rows: dict[tuple[Any, ...], Row]) -> None:
        self.check(rows)
        with self._lock:
            for labels, row in rows.items():
                mine = self.rows.get(labels)
                if mine is None:
                    self.rows[labels] = list(row)
                else:
                    for index, value in enumerate(row):
                        mine[index] += value

    def copy(self) -> dict[tuple[Any, ...], Row]:
        with self._lock:
            return {labels: list(row) for labels, row in self.rows.items()}


class RequestTallies:
    """Requests by (operation, outcome) with their durations; HSM calls by (call, failed)."""

    def __init__(self, latency_bounds: tuple[float, ...], hsm_bounds: tuple[float, ...]) -> None:
        self.requests = Histograms(latency_bounds)
        self.hsm = Histograms(hsm_bounds)

    def observe_request(self, operation: str, outcome: str, seconds: float) -> None:
        self.requests.observe((operation, outcome), seconds)

    def observe_hsm(self, call: str, seconds: float, failed: bool) -> None:
        self.hsm.observe((call, failed), seconds)

    # -- between processes -------------------------------------------------------

    def take_wire(self) -> list[Any] | None:
        """What was observed since the last take, as msgpack-able lists; None: nothing."""
        requests, hsm = self.requests.take(), self.hsm.take()
        if not requests and not hsm:
            return None
        return [[[*labels, row] for labels, row in requests.items()],
                [[*labels, row] for labels, row in hsm.items()]]

    def merge_wire(self, body: Any) -> None:
        """Add what `take_wire` gave in another process. Raises ValueError or TypeError on
        anything else, and then adds nothing."""
        requests_part, hsm_part = _sequence(body, 2)
        requests = {(_text(op), _text(outcome)): _row(row)
                    for op, outcome, row in map(_triple, _sequence(requests_part))}
        hsm = {(_text(call), _flag(failed)): _row(row)
               for call, failed, row in map(_triple, _sequence(hsm_part))}
        # (both checked before either merge: a report with one bad row adds nothing)
        self.requests.check(requests)
        self.hsm.check(hsm)
        self.requests.merge(requests)
        self.hsm.merge(hsm)

    # -- at scrape time ------------------------------------------------------------

    def families(self) -> Iterator[Any]:
        requests, hsm = self.requests.copy(), self.hsm.copy()
        counts = CounterMetricFamily("kmsd_requests", "Requests by operation and outcome.",
                                     labels=["operation", "outcome"])
        for (operation, outcome), row in requests.items():
            counts.add_metric([operation, outcome], sum(row[:-1]))
        yield counts
        yield histogram_family("kmsd_request_duration_seconds",
                               "Request latency, audit commit included.", "operation",
                               self.requests.bounds, _by_first_label(requests))
        yield histogram_family("kmsd_hsm_call_duration_seconds", "HSM call latency.", "call",
                               self.hsm.bounds, _by_first_label(hsm))
        errors = CounterMetricFamily("kmsd_hsm_errors", "HSM calls that failed.",
                                     labels=["call"])
        for (call, failed), row in hsm.items():
            if failed:
                errors.add_metric([call], sum(row[:-1]))
        yield errors


def _sequence(value: Any, length: int | None = None) -> list[Any] | tuple[Any, ...]:
    if type(value) not in (list, tuple) or (length is not None and len(value) != length):
        raise TypeError("not a list of the expected length")
    return value


def _triple(value: Any) -> list[Any] | tuple[Any, ...]:
    return _sequence(value, 3)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("a label is not a str")
    return value


def _flag(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError("a failed flag is not a bool")
    return value


def _row(value: Any) -> Row:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError("a histogram row is not a list")
    *counts, total = value
    if any(type(c) is not int or c < 0 for c in counts) or type(total) not in (int, float):
        raise TypeError("a histogram row holds other than counts and a sum")
    return [*counts, float(total)]


def _by_first_label(rows: dict[tuple[Any, ...], Row]) -> dict[str, Row]:
    """Rows summed over every label but the first, in the order each first label came."""
    out: dict[str, Row] = {}
    for labels, row in rows.items():
        mine = out.get(labels[0])
        if mine is None:
            out[labels[0]] = list(row)
        else:
            for index, value in enumerate(row):
                mine[index] += value
    return out


def histogram_family(name: str, documentation: str, label: str, bounds: tuple[float, ...],
                     rows: dict[str, Row]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, row in rows.items():
        cumulative, buckets = 0.0, []
        for bound, count in zip((*bounds, float("inf")), row[:-1], strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([value], buckets, sum_value=row[-1])
    return family
