"""Request metrics as the request path records them."""

from __future__ import annotations

import random

import msgpack
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kmsd.metric_tally import RequestTallies
from kmsd.metrics import HSM_BUCKETS, LATENCY_BUCKETS, NodeFacts, NodeMetrics


def samples(metrics: NodeMetrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_request_counts_and_durations_by_operation_and_outcome() -> None:
    metrics = NodeMetrics(NodeFacts("n", "az", "r", dict, list, lambda: (0, 0), lambda: None))
    for operation, outcome, seconds in (("Decrypt", "ok", 0.0004), ("Decrypt", "ok", 0.002),
                                        ("Decrypt", "AccessDeniedException", 0.003),
                                        ("Encrypt", "ok", 0.7), ("Decrypt", "ok", 0.0004)):
        metrics.observe_request(operation, outcome, seconds)
    seen = samples(metrics)
    assert seen["kmsd_requests_total{operation=Decrypt,outcome=ok}"] == 3
    assert seen["kmsd_requests_total{operation=Decrypt,outcome=AccessDeniedException}"] == 1
    assert seen["kmsd_requests_total{operation=Encrypt,outcome=ok}"] == 1
    assert seen["kmsd_request_duration_seconds_count{operation=Decrypt}"] == 4
    assert seen["kmsd_request_duration_seconds_bucket{le=0.0005,operation=Decrypt}"] == 2
    assert seen["kmsd_request_duration_seconds_sum{operation=Encrypt}"] == pytest.approx(0.7)



def _facts() -> NodeFacts:
    return NodeFacts("n", "az", "r", dict, list, lambda: (0, 0), lambda: None)


def _without_created(text: bytes) -> list[str]:
    # *_created samples are the wall-clock time a series was made: the only lines that differ.
    return [line for line in text.decode().splitlines() if "_created" not in line]


class _Reference:
    """The same metrics as prometheus_client's labelled Counter and Histogram keep them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kmsd_requests", "Requests by operation and outcome.",
                                ["operation", "outcome"], registry=self.registry)
        self.request_duration = Histogram(
            "kmsd_request_duration_seconds", "Request latency, audit commit included.",
            ["operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.hsm_duration = Histogram("kmsd_hsm_call_duration_seconds", "HSM call latency.",
                                      ["call"], buckets=HSM_BUCKETS, registry=self.registry)
        self.hsm_errors = Counter("kmsd_hsm_errors", "HSM calls that failed.", ["call"],
                                  registry=self.registry)

    def lines(self) -> list[str]:
        return _without_created(generate_latest(self.registry))


def _tally_lines(metrics: NodeMetrics) -> list[str]:
    """The rendered lines of the four tallied families: they come first, before the audit
    batch metrics."""
    lines = _without_created(metrics.render())
    return lines[:next(n for n, line in enumerate(lines)
                       if line.startswith("# HELP kmsd_audit_batch_size "))]


def _sum_rounded(line: str) -> str:
    if "_sum{" not in line:
        return line
    name, value = line.rsplit(" ", 1)
    return f"{name} {float(value):.9g}"


def test_tallies_render_what_the_labelled_prometheus_metrics_do() -> None:
    tallied, reference = NodeMetrics(_facts()), _Reference()
    rng = random.Random(7)
    for _ in range(2000):
        operation = rng.choice(("Decrypt", "Encrypt", "GenerateDataKey"))
        outcome = rng.choice(("ok", "ok", "ok", "AccessDeniedException"))
        seconds = rng.choice((rng.uniform(0, 0.02), rng.uniform(0, 12), 0.0005, 10.0, 11.5))
        call = rng.choice(("C_Decrypt", "C_Encrypt", "C_Sign"))
        hsm_seconds, failed = rng.uniform(0, 0.003), rng.random() < 0.1
        tallied.observe_request(operation, outcome, seconds)
        tallied.observe_hsm(call, hsm_seconds, failed)
        reference.requests.labels(operation, outcome).inc()
        reference.request_duration.labels(operation).observe(seconds)
        reference.hsm_duration.labels(call).observe(hsm_seconds)
        if failed:
            reference.hsm_errors.labels(call).inc()
    mine, theirs = _tally_lines(tallied), reference.lines()
    # A sum adds the same values in another order (per outcome first): the last digits differ.
    assert [_sum_rounded(line) for line in mine] == [_sum_rounded(line) for line in theirs]
    seen = samples(tallied)
    assert sum(v for k, v in seen.items() if k.startswith("kmsd_requests_total{")) == 2000
    assert sum(v for k, v in seen.items()
               if k.startswith("kmsd_hsm_call_duration_seconds_count{")) == 2000
    assert any(k.startswith("kmsd_hsm_errors_total{") for k in seen)


def test_a_workers_tallies_merged_render_as_if_observed_here() -> None:
    here, split = NodeMetrics(_facts()), NodeMetrics(_facts())
    worker = RequestTallies(LATENCY_BUCKETS, HSM_BUCKETS)
    rng = random.Random(11)
    for n in range(600):
        operation, outcome = rng.choice(("Decrypt", "Encrypt")), rng.choice(("ok", "Denied"))
        seconds, call, failed = rng.uniform(0, 3), rng.choice(("decrypt", "unwrap")), n % 7 == 0
        here.observe_request(operation, outcome, seconds)
        here.observe_hsm(call, seconds / 100, failed)
        (worker if n % 3 else split).observe_request(operation, outcome, seconds)
        (worker if n % 3 else split).observe_hsm(call, seconds / 100, failed)
        if n % 50 == 49:  # as a worker reports now and then, through msgpack
            split.merge_observed(msgpack.unpackb(msgpack.packb(worker.take_wire())))
    worker.observe_request("Decrypt", "ok", 0.25)
    here.observe_request("Decrypt", "ok", 0.25)
    split.merge_observed(msgpack.unpackb(msgpack.packb(worker.take_wire())))
    assert worker.take_wire() is None  # taken: nothing is sent twice
    assert sorted(map(_sum_rounded, _tally_lines(split))) == sorted(
        map(_sum_rounded, _tally_lines(here)))
    assert samples(split).keys() == samples(here).keys()
    for name, value in samples(here).items():
        if "_created" not in name:
            assert samples(split)[name] == pytest.approx(value), name
