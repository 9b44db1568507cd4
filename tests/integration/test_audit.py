"""The audit chain on a real cluster: one record per request, fail-closed, tamper-evident,
revocation at the disabling log position, identical chains on every node."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, start_cluster, stored_views, wait_for


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("audited")))
    yield running
    running.stop()


def records(cluster: Cluster, node: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = cluster.admin(node, "GET", f"/v1/audit/records?after={len(out)}&limit=1000")
        if not page["Records"]:
            return out
        out += page["Records"]


def head(cluster: Cluster, node: int) -> dict[str, Any]:
    return cluster.admin(node, "GET", "/v1/audit/verify")


def wait_same_heads(cluster: Cluster, nodes: list[int]) -> dict[str, Any]:
    def same() -> dict[str, Any] | None:
        heads = [head(cluster, n)["expected_head"] for n in nodes]
        return heads[0] if all(h == heads[0] for h in heads) else None
    return wait_for(same, 30, interval=0.3, what="identical chain heads")


def request_id(response_or_error: Any) -> str:
    if isinstance(response_or_error, ClientError):
        return response_or_error.response["ResponseMetadata"]["RequestId"]
    return response_or_error["ResponseMetadata"]["RequestId"]


def outcome(call: Any) -> tuple[str, str | None]:
    """(request id, error code or None) of one call."""
    try:
        return request_id(call()), None
    except ClientError as error:
        return request_id(error), error.response["Error"]["Code"]


def test_every_request_served_or_refused_has_exactly_one_record(audited: Cluster) -> None:
    key = audited.client(0).create_key()["KeyMetadata"]
    secret = b"never in the audit log"
    blob = audited.client(1).encrypt(KeyId=key["KeyId"], Plaintext=secret,
                                     EncryptionContext={"dept": "eng"})
    calls = {
        "decrypt": outcome(lambda: audited.client(2).decrypt(
            CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"dept": "eng"})),
        "bad-context": outcome(lambda: audited.client(0).decrypt(
            CiphertextBlob=blob["CiphertextBlob"])),
        "bad-secret": outcome(lambda: audited.client(
            1, secret_access_key="x" * 40, retries=1).list_keys()),
        "unknown-key": outcome(lambda: audited.client(1).describe_key(KeyId="alias/none")),
        "validation": outcome(lambda: audited.client(2).generate_data_key(
            KeyId=key["KeyId"], KeySpec="AES_256", NumberOfBytes=8)),
        "data-key": outcome(lambda: audited.client(0).generate_data_key(
            KeyId=key["KeyId"], KeySpec="AES_256")),
    }
    calls["encrypt"] = (request_id(blob), None)
    assert calls["decrypt"][1] is None and calls["data-key"][1] is None
    assert calls["bad-context"][1] == "InvalidCiphertextException"
    assert calls["bad-secret"][1] == "InvalidSignatureException"
    tip = wait_same_heads(audited, [0, 1, 2])
    chain = records(audited, 0)
    assert chain[-1]["seq"] == tip["seq"]
    by_request: dict[str, list[dict[str, Any]]] = {}
    for record in chain:
        by_request.setdefault(record["event"]["requestID"], []).append(record)
    for name, (rid, error) in calls.items():
        assert len(by_request.get(rid, [])) == 1, f"{name} has {len(by_request.get(rid, []))}"
        event = by_request[rid][0]["event"]
        assert event.get("errorCode") == error, name
        assert event["eventSource"] == "kms.amazonaws.com"
    decrypt = by_request[calls["decrypt"][0]][0]["event"]
    assert decrypt["eventName"] == "Decrypt"
    assert decrypt["requestParameters"]["keyId"] == key["Arn"]
    assert decrypt["requestParameters"]["encryptionContext"] == {"dept": "eng"}
    assert decrypt["requestParameters"]["encryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert decrypt["resources"][0]["ARN"] == key["Arn"]
    assert decrypt["userIdentity"]["accessKeyId"] == audited.info["access_key_id"]
    assert by_request[calls["bad-secret"][0]][0]["event"]["userIdentity"]["type"] != "Root"
    # Each record names the node that served it, and the chain links.
    assert [r["node"] for r in by_request[calls["decrypt"][0]]] == ["node-3"]
    for before, after in zip(chain, chain[1:], strict=False):
        assert after["prev_hash"] == before["hash"] and after["seq"] == before["seq"] + 1
    serialized = json.dumps(chain).encode()
    assert secret not in serialized
    for node in range(audited.size):
        for directory, _, names in os.walk(os.path.join(audited.data_dir, f"node-{node + 1}")):
            for name in names:
                for view in stored_views(os.path.join(directory, name)):
                    assert secret not in view


def test_get_key_last_usage_follows_the_committed_chain(audited: Cluster) -> None:
    key = audited.client(0).create_key()["KeyMetadata"]
    before = audited.client(1).get_key_last_usage(KeyId=key["KeyId"])
    assert "KeyLastUsage" not in before
    response = audited.client(2).encrypt(KeyId=key["KeyId"], Plaintext=b"u")
    usage = wait_for(lambda: audited.client(1).get_key_last_usage(
        KeyId=key["KeyId"]).get("KeyLastUsage"), 5, what="last usage")
    assert usage["Operation"] == "Encrypt"
    assert usage["KmsRequestId"] == request_id(response)


def test_kmsctl_verify_export_and_tail(audited: Cluster, tmp_path) -> None:
    key = audited.client(0).create_key()["KeyMetadata"]
    blob = audited.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"e")["CiphertextBlob"]
    audited.client(1).decrypt(CiphertextBlob=blob)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": audited.info["access_key_id"],
           "AWS_SECRET_ACCESS_KEY": audited.info["secret_access_key"],
           "KMSD_ADMIN_ENDPOINT": audited.info["admin_endpoints"][0]}
    kmsctl = [sys.executable, "-m", "kmsd.kmsctl"]
    verified = subprocess.run([*kmsctl, "audit", "verify", "--node", "node-2"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    out = tmp_path / "decrypts.jsonl"
    subprocess.run([*kmsctl, "audit", "export", "--event", "Decrypt", "--out", str(out)],
                   env=env, check=True, capture_output=True, timeout=60)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert events and {e["eventName"] for e in events} == {"Decrypt"}
    tail = subprocess.Popen([*kmsctl, "audit", "tail", "--count", "1"], env=env,
                            stdout=subprocess.PIPE, text=True)
    sent: set[str] = set()
    deadline = time.monotonic() + 30
    while tail.poll() is None and time.monotonic() < deadline:
        sent.add(request_id(audited.client(0).generate_random(NumberOfBytes=8)))
        time.sleep(0.3)
    line, _ = tail.communicate(timeout=10)
    followed = json.loads(line.splitlines()[0])["event"]
    assert followed["eventName"] == "GenerateRandom" and followed["requestID"] in sent


def _tamper(source: str, target: str, how: str) -> int:
    """Copy a segment directory and damage one record; return the seq it damaged."""
    shutil.copytree(source, target)
    segment = sorted(os.listdir(target))[0]
    path = os.path.join(target, segment)
    with open(path, "rb") as handle:
        lines = handle.read().splitlines(keepends=True)
    victim = len(lines) // 2
    seq = json.loads(lines[victim])["seq"]
    if how == "flip":
        line = bytearray(lines[victim])
        line[line.index(b'"eventName"') + 14] ^= 0x01
        lines[victim] = bytes(line)
    elif how == "remove":
        del lines[victim]
    else:
        lines[victim], lines[victim + 1] = lines[victim + 1], lines[victim]
    with open(path, "wb") as handle:
        handle.writelines(lines)
    return seq


@pytest.mark.parametrize("how", ["flip", "remove", "swap"])
def test_tampering_is_detected_and_named(audited: Cluster, tmp_path, how: str) -> None:
    for _ in range(10):
        audited.client(1).list_aliases()
    wait_same_heads(audited, [0, 1, 2])
    source = os.path.join(audited.data_dir, "node-2", "data", "audit")
    seq = _tamper(source, str(tmp_path / how), how)
    result = subprocess.run([sys.executable, "-m", "kmsd.cli", "audit-verify", "--dir",
                             str(tmp_path / how)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["error"]["seq"] == seq or report["error"]["expected_seq"] == seq
    assert report["error"]["file"].startswith("seg-")
    untouched = subprocess.run([sys.executable, "-m", "kmsd.cli", "audit-verify", "--dir",
                                source], capture_output=True, text=True, timeout=60)
    assert json.loads(untouched.stdout)["ok"] is True


def test_no_decrypt_succeeds_after_the_disable_position(audited: Cluster) -> None:
    key = audited.client(0).create_key()["KeyMetadata"]
    blob = audited.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"flood")["CiphertextBlob"]
    results: list[tuple[str, str | None]] = []
    stop = threading.Event()

    def flood() -> None:
        client = audited.client(2, retries=1)
        while not stop.is_set():
            results.append(outcome(lambda: client.decrypt(CiphertextBlob=blob)))

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    disable_id = request_id(audited.client(0).disable_key(KeyId=key["KeyId"]))
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    served = [rid for rid, error in results if error is None]
    refused = [rid for rid, error in results if error is not None]
    assert served and refused, (len(served), len(refused))
    assert {error for _, error in results if error} == {"DisabledException"}
    wait_same_heads(audited, [0, 1, 2])
    chain = records(audited, 1)
    by_request = {r["event"]["requestID"]: r for r in chain}
    disable_seq = by_request[disable_id]["seq"]
    for rid in served:
        assert not by_request[rid]["revoked"] and "errorCode" not in by_request[rid]["event"]
        assert by_request[rid]["seq"] < disable_seq
    for rid in refused:
        assert rid in by_request  # every refused call has its record
    late_successes = [r for r in chain if r["seq"] > disable_seq
                      and r["event"]["eventName"] == "Decrypt"
                      and key["Arn"] in json.dumps(r["event"].get("resources"))
                      and "errorCode" not in r["event"] and not r["revoked"]]
    assert late_successes == []


def test_a_minority_node_serves_nothing_and_loses_no_record(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("minority")))
    try:
        key = cluster.client(0).create_key()["KeyMetadata"]
        blob = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"m")["CiphertextBlob"]
        served = [request_id(cluster.client(0).decrypt(CiphertextBlob=blob))]
        for node in (1, 2):
            os.kill(cluster.pid(node), signal.SIGSTOP)
        try:
            time.sleep(2.0)  # longer than an election timeout
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(ClientError) as excinfo:
                    cluster.client(0, retries=1).decrypt(CiphertextBlob=blob)
                assert excinfo.value.response["Error"]["Code"] == "KMSInternalException"
                assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
                # Refused within the wait for a reachable leader (3 s) plus, at most, the
                # commit timeout (5 s) of a batch sent to a leader that is not answering.
                assert time.monotonic() - started < 12
        finally:
            for node in (1, 2):
                os.kill(cluster.pid(node), signal.SIGCONT)
        served.append(wait_for(lambda: request_id(cluster.client(0).decrypt(
            CiphertextBlob=blob)), 30, what="service after the partition heals"))
        wait_same_heads(cluster, [0, 1, 2])
        chain_ids = {r["event"]["requestID"] for r in records(cluster, 2)}
        assert set(served) <= chain_ids
    finally:
        cluster.stop()


def test_chains_are_identical_after_a_leader_kill(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("leaderkill")))
    try:
        key = cluster.client(0).create_key()["KeyMetadata"]
        stop = threading.Event()

        def traffic(node: int) -> None:
            client = cluster.client(node, retries=3)
            while not stop.is_set():
                outcome(lambda: client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256"))

        leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
        others = [n for n in range(cluster.size) if n != leader]
        threads = [threading.Thread(target=traffic, args=(n,)) for n in others]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        cluster.kill(leader)
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join()
        cluster.restart(leader)
        tip = wait_same_heads(cluster, [0, 1, 2])
        chains = [[r["hash"] for r in records(cluster, n)] for n in range(cluster.size)]
        assert chains[0] == chains[1] == chains[2]
        assert len(chains[0]) == tip["seq"]
        for node in range(cluster.size):
            assert head(cluster, node)["ok"] is True
    finally:
        cluster.stop()


def test_signed_digests_verify_offline_and_expose_a_rewritten_history(
        audited: Cluster, tmp_path) -> None:
    audited.client(0).list_keys()
    signed = audited.admin(1, "POST", "/v1/audit/digest")
    public = audited.admin(2, "GET", "/v1/audit/public-key")
    assert public["KeySpec"] == "ECC_NIST_P256" and public["SigningAlgorithm"] == "ECDSA_SHA_256"
    tip = wait_same_heads(audited, [0, 1, 2])
    assert tip["seq"] >= signed["seq"]
    report = head(audited, 0)
    assert report["ok"] is True and report["digests"]["digests"] >= 1
    digest = next(r for r in records(audited, 0) if r["seq"] == signed["seq"])
    assert digest["event"]["eventName"] == "AuditDigest"
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from kmsd.audit.digests import digest_message

    data = digest["event"]["additionalEventData"]
    key = serialization.load_der_public_key(base64.b64decode(public["PublicKey"]))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(data["signature"]),
               digest_message(data["digestSeq"], data["digestHash"],
                              digest["event"]["eventTime"]), ec.ECDSA(hashes.SHA256()))
    source = os.path.join(audited.data_dir, "node-1", "data", "audit")
    ok = subprocess.run([sys.executable, "-m", "kmsd.cli", "audit-verify", "--dir", source,
                         "--public-key", public["PublicKey"]], capture_output=True, text=True,
                        timeout=60)
    assert json.loads(ok.stdout)["ok"] is True, ok.stdout
    # A history rewritten consistently (hashes recomputed) still fails the signed digest.
    rewritten = tmp_path / "rewritten"
    shutil.copytree(source, rewritten)
    _rewrite_first_record(rewritten)
    bad = subprocess.run([sys.executable, "-m", "kmsd.cli", "audit-verify", "--dir",
                          str(rewritten), "--public-key", public["PublicKey"]],
                         capture_output=True, text=True, timeout=60)
    report = json.loads(bad.stdout)
    assert bad.returncode == 1 and report["digests"]["bad_seq"] is not None


def _rewrite_first_record(directory: Any) -> None:
    """Change the first record's event and recompute every hash after it, as a forger would."""
    from kmsd.audit.chain import GENESIS_HASH, ChainedRecord, canonical_bytes, record_hash

    prev = GENESIS_HASH
    for segment in sorted(os.listdir(directory)):
        path = os.path.join(directory, segment)
        out = []
        with open(path, "rb") as handle:
            for raw in handle.read().splitlines():
                data = json.loads(raw)
                event = data["event"]
                if data["seq"] == 1:
                    event["userAgent"] = "forged"
                event_bytes = canonical_bytes(event)
                digest = record_hash(data["seq"], prev, data["node"], data["revoked"], event_bytes)
                out.append(ChainedRecord(data["seq"], prev, digest, data["node"],
                                         data["revoked"], event_bytes).to_line())
                prev = digest
        with open(path, "wb") as handle:
            handle.writelines(out)
