"""Request metrics as the request path records them."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmsd.metrics import NodeFacts, NodeMetrics


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


def test_cached_children_render_what_the_labelled_metrics_do() -> None:
    cached, reference = NodeMetrics(_facts()), NodeMetrics(_facts())
    rng = random.Random(7)
    for _ in range(2000):
        operation = rng.choice(("Decrypt", "Encrypt", "GenerateDataKey"))
        outcome = rng.choice(("ok", "ok", "ok", "AccessDeniedException"))
        seconds = rng.choice((rng.uniform(0, 0.02), rng.uniform(0, 12), 0.0005, 10.0, 11.5))
        call = rng.choice(("C_Decrypt", "C_Encrypt", "C_Sign"))
        hsm_seconds, failed = rng.uniform(0, 0.003), rng.random() < 0.1
        cached.observe_request(operation, outcome, seconds)
        cached.observe_hsm(call, hsm_seconds, failed)
        reference.requests.labels(operation, outcome).inc()
        reference.request_duration.labels(operation).observe(seconds)
        reference.hsm_duration.labels(call).observe(hsm_seconds)
        if failed:
            reference.hsm_errors.labels(call).inc()
    rendered = _without_created(cached.render())
    assert rendered == _without_created(reference.render())
    seen = samples(cached)
    assert sum(v for k, v in seen.items() if k.startswith("kmsd_requests_total{")) == 2000
    assert sum(v for k, v in seen.items()
               if k.startswith("kmsd_hsm_call_duration_seconds_count{")) == 2000
    assert any(k.startswith("kmsd_hsm_errors_total{") for k in seen)
