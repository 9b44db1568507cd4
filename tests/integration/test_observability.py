"""/metrics, /healthz and /readyz of a real node."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Cluster


def scrape(cluster: Cluster, node: int) -> dict[str, float]:
    with urllib.request.urlopen(cluster.info["endpoints"][node] + "/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_parse_and_move_with_traffic(cluster: Cluster) -> None:
    before = scrape(cluster, 1)
    key = cluster.client(1).create_key()["KeyMetadata"]
    blob = cluster.client(1).encrypt(KeyId=key["KeyId"], Plaintext=b"m")["CiphertextBlob"]
    for _ in range(5):
        cluster.client(1).decrypt(CiphertextBlob=blob)
    after = scrape(cluster, 1)
    ok_decrypts = "kmsd_requests_total{operation=Decrypt,outcome=ok}"
    assert after[ok_decrypts] - before.get(ok_decrypts, 0) >= 5
    assert after["kmsd_request_duration_seconds_count{operation=Decrypt}"] >= 5
    assert after["kmsd_hsm_call_duration_seconds_count{call=decrypt}"] >= 5
    assert after["kmsd_audit_batch_size_count{}"] > before.get("kmsd_audit_batch_size_count{}", 0)
    assert after["kmsd_audit_commit_duration_seconds_count{}"] >= 1
    assert after["kmsd_keys{state=Enabled}"] >= 1
    assert after["kmsd_raft_term{}"] >= 1 and after["kmsd_raft_commit_index{}"] > 0
    assert after["kmsd_raft_has_leader{}"] == 1
    assert after["kmsd_node_info{az=az-2,node_id=node-2,region=us-east-1}"] == 1
    assert after["kmsd_raft_is_leader{}"] in (0, 1)
    assert after["kmsd_hsm_handle_cache_hits_total{}"] >= 1
    leaders = sum(scrape(cluster, n)["kmsd_raft_is_leader{}"] for n in range(cluster.size))
    assert leaders == 1


def test_the_start_up_heap_is_frozen_and_collections_are_timed(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    for _ in range(20):
        cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"m")
    for node in range(cluster.size):
        samples = scrape(cluster, node)
        # Modules, botocore's model, the validators: tens of thousands of objects that full
        # collections no longer walk (kmsd.gc_pauses).
        assert samples["kmsd_gc_frozen_objects{}"] > 20_000
        assert samples["kmsd_gc_pause_seconds_count{generation=0}"] >= 1
        assert samples["kmsd_gc_pause_seconds_sum{generation=0}"] > 0


def test_each_node_times_its_event_loop(cluster: Cluster) -> None:
    for node in range(cluster.size):
        first = scrape(cluster, node)["kmsd_event_loop_lag_seconds_count{}"]
        time.sleep(0.6)  # a probe runs every 0.25 s
        samples = scrape(cluster, node)
        assert samples["kmsd_event_loop_lag_seconds_count{}"] >= first + 1
        assert samples["kmsd_event_loop_lag_seconds_bucket{le=+Inf}"] == \
            samples["kmsd_event_loop_lag_seconds_count{}"]
        assert samples["kmsd_event_loop_lag_seconds_sum{}"] >= 0


def test_health_and_readiness(cluster: Cluster) -> None:
    for node in range(cluster.size):
        with urllib.request.urlopen(cluster.info["endpoints"][node] + "/healthz") as response:
            assert response.status == 200
        assert cluster.ready(node)
