"""Prometheus metrics of one node, served at `/metrics` with the official client.

Requests and HSM calls are counted on the request path in plain tallies
(kmsd.metric_tally: ~1.5 µs an observation, against ~3.5 through prometheus_client's
labelled metrics; an API worker's are merged into its primary's);
the audit batch metrics are prometheus_client's own;
gauges that describe state (Raft role and indexes, keys by state, cache
counters, certificate expiry) are read at scrape time by a collector, so they
cost nothing between scrapes. No label ever carries a key id, a principal or
any request content: only operation names, outcomes and HSM call names.
"""

from __future__ import annotations

import gc
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kmsd.gc_pauses import GcPauses
from kmsd.metric_tally import RequestTallies, histogram_family

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10)
HSM_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Up to the election timeouts (0.4-1.4 s) and past them.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.4, 1.0, 2.5)


@dataclass(frozen=True)
class NodeFacts:
    """Readers of node state the collector calls at scrape time."""

    node_id: str
    az: str
    region: str
    raft_status: Callable[[], dict[str, Any]]
    key_states: Callable[[], list[str]]
    cache_counts: Callable[[], tuple[int, int]]
    certificate_expiry: Callable[[], float | None]


class _StateCollector(Collector):
    def __init__(self, facts: NodeFacts) -> None:
        self.facts = facts

    def collect(self) -> Iterator[Any]:
        facts = self.facts
        info = GaugeMetricFamily("kmsd_node_info", "This node's identity.",
                                 labels=["node_id", "az", "region"])
        info.add_metric([facts.node_id, facts.az, facts.region], 1)
        yield info
        raft = facts.raft_status()
        applied = raft.get("applied_index") or 0
        for name, doc, value in (
                ("kmsd_raft_is_leader", "1 if this node is the Raft leader.",
                 raft.get("role") == "leader"),
                ("kmsd_raft_has_leader", "1 if this node knows a leader.",
                 raft.get("leader") is not None),
                ("kmsd_raft_term", "Current Raft term.", raft.get("term") or 0),
                ("kmsd_raft_commit_index", "Raft commit index.", raft.get("commit_index") or 0),
                ("kmsd_raft_applied_index", "Last applied Raft index.", applied),
                ("kmsd_raft_lag_entries", "Leader commit index minus this node's applied index.",
                 max(0, (raft.get("leader_commit_index") or applied) - applied))):
            yield GaugeMetricFamily(name, doc, value=float(value))
        keys = GaugeMetricFamily("kmsd_keys", "KMS keys by key state.", labels=["state"])
        for state, count in sorted(Tally(facts.key_states()).items()):
            keys.add_metric([state], count)
        yield keys
        hits, misses = facts.cache_counts()
        yield CounterMetricFamily("kmsd_hsm_handle_cache_hits", "Unwrapped-key cache hits.",
                                  value=hits)
        yield CounterMetricFamily("kmsd_hsm_handle_cache_misses", "Unwrapped-key cache misses.",
                                  value=misses)
        expiry = facts.certificate_expiry()
        if expiry is not None:
            yield GaugeMetricFamily("kmsd_tls_certificate_expiry_timestamp_seconds",
                                    "When this node's TLS certificate expires.", value=expiry)


class _TallyCollector(Collector):
    def __init__(self, tallies: RequestTallies) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator[Any]:
        return self.tallies.families()


class _GcCollector(Collector):
    def __init__(self, pauses: GcPauses) -> None:
        self.pauses = pauses

    def collect(self) -> Iterator[Any]:
        yield histogram_family(
            "kmsd_gc_pause_seconds",
            "Garbage collections of the primary process, by generation (2: full).",
            "generation", self.pauses.bounds, self.pauses.copy())
        yield GaugeMetricFamily(
            "kmsd_gc_frozen_objects",
            "Objects of the primary process that garbage collections skip (kmsd.gc_pauses).",
            value=gc.get_freeze_count())


class NodeMetrics:
    def __init__(self, facts: NodeFacts) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.tallies = RequestTallies(LATENCY_BUCKETS, HSM_BUCKETS)
        registry.register(_TallyCollector(self.tallies))
        # (bound methods looked up once: these run on every request)
        self.observe_request = self.tallies.observe_request
        self.observe_hsm = self.tallies.observe_hsm
        self.audit_batch_size = Histogram("kmsd_audit_batch_size",
                                          "Audit records per committed Raft entry.",
                                          buckets=_BATCH_BUCKETS, registry=registry)
        self.audit_commit_duration = Histogram(
            "kmsd_audit_commit_duration_seconds", "Time to commit one audit batch.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.audit_commit_failures = Counter(
            "kmsd_audit_commit_failures", "Audit records that could not be committed.",
            registry=registry)
        self.loop_lag = Histogram(
            "kmsd_event_loop_lag_seconds",
            "How late the primary process's event loop ran a timer due every 0.25 s; the "
            "loop also runs the Raft ticks (kmsd.loop_lag).",
            buckets=LOOP_LAG_BUCKETS, registry=registry)
        # Installed by the node (it owns when the process serves); read at scrape time.
        self.gc_pauses = GcPauses(GC_BUCKETS)
        registry.register(_GcCollector(self.gc_pauses))
        registry.register(_StateCollector(facts))

    def merge_observed(self, body: Any) -> None:
        """An API worker's tallies (RequestTallies.take_wire) into this node's."""
        self.tallies.merge_wire(body)

    def observe_audit_batch(self, size: int, seconds: float) -> None:
        self.audit_batch_size.observe(size)
        self.audit_commit_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
