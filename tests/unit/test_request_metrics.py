"""Request metrics as the request path records them."""

from __future__ import annotations

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

