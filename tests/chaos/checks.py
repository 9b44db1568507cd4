"""What a chaos run checks once the faults are over and the cluster is whole again.

- writes: every acknowledged key, alias and grant is present on every node; no key,
  alias or grant exists that no client asked for; a write whose answer was lost may
  or may not be there, and one retried by the SDK after a lost answer may be there
  more than once, never more often than it was attempted.
- key state: a key whose every enable/disable was answered ends in the state of its
  last answer on every node; on-demand rotations lie between the acknowledged count
  and the acknowledged plus the unanswered ones.
- ciphertexts: every blob any client received decrypts, on every node in turn, to
  the bytes that were sealed.
- audit: the chains of all nodes are identical and verify; every request that got an
  answer has exactly one record (one the fail-closed path refused for want of a
  quorum has at most one: its batch may commit after the answer); a record that no
  answered request accounts for belongs to an attempt that got no answer.
- availability per fault kind and the longest time without a successful write.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tests.chaos.faults import FaultWindow
from tests.chaos.workload import WRITE_OPS, Call, Ledger, Sealed, make_client
from tests.integration.harness import Cluster, wait_for

# Prefix of the violations where a node's segment files lack records it declares lacking.
SEGMENT_GAP = "segment gap:"


@dataclass
class CheckResult:
    name: str
    counts: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(message)
        self.counts["violations"] = self.counts.get("violations", 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts, "violations": self.violations[:50]}


def _paged(call: Any, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    marker = None
    for _ in range(10_000):
        page = call(**kwargs, **({"Marker": marker} if marker else {}))
        out += page.get(key, [])
        if not page.get("Truncated"):
            return out
        marker = page["NextMarker"]
    raise AssertionError(f"{key}: pagination did not end")


# Audit chains.
def audit_records(cluster: Cluster, node: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    for _ in range(100_000):
        page = cluster.admin(node, "GET", f"/v1/audit/records?after={after}&limit=1000")
        if not page["Records"]:
            return out
        out += page["Records"]
        after = page["Records"][-1]["seq"]  # not len(out): a node's files may have a gap
    raise AssertionError("audit records did not end")


def wait_same_heads(cluster: Cluster, timeout: float = 90.0) -> dict[str, Any]:
    def same() -> dict[str, Any] | None:
        heads = [cluster.admin(n, "GET", "/v1/audit/verify")["expected_head"]
                 for n in range(cluster.size)]
        return heads[0] if all(h == heads[0] for h in heads) else None
    return wait_for(same, timeout, interval=0.5, what="identical audit chain heads")


def check_audit(cluster: Cluster, ledger: Ledger) -> tuple[CheckResult, list[dict[str, Any]]]:
    """Compare every node's chain record by record (by seq), verify each, and match the
    records to the requests that were answered.

    A node whose segment files lack records (a stretch it never wrote and could not fetch
    from a peer) is counted apart from a divergence (two nodes holding different records
    at one seq: a node applied an entry the cluster did not commit)."""
    result = CheckResult("audit")
    tip = wait_same_heads(cluster)
    length = tip["seq"]
    # A node that missed records (restarted from a snapshot) fetches them from a peer
    # (kmsd/audit/backfill.py): give it a bounded time to catch up before comparing.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(cluster.admin(n, "GET", "/v1/audit/verify")["ok"]
                             for n in range(cluster.size)), 60, interval=1.0,
                 what="every node's audit chain to verify")
    chains = [audit_records(cluster, n) for n in range(cluster.size)]
    verified = [cluster.admin(n, "GET", "/v1/audit/verify") for n in range(cluster.size)]
    by_seq: dict[int, dict[str, Any]] = {}
    gaps: dict[str, list[int]] = {}
    diverged: set[int] = set()
    diverged_ids: dict[str, str] = {}  # request id of a diverged record -> its node
    for node, chain in enumerate(chains):
        held = {r["seq"] for r in chain if r["seq"] <= length}
        missing = [seq for seq in range(1, length + 1) if seq not in held]
        if missing:
            gaps[f"node-{node + 1}"] = [missing[0], missing[-1], len(missing)]
            result.fail(f"{SEGMENT_GAP} node-{node + 1}'s segments lack {len(missing)} of "
                        f"{length} records (seq {missing[0]}..{missing[-1]}); its verify says "
                        f"{verified[node].get('segment_gap') or verified[node].get('error')}")
        if not verified[node]["ok"] and not missing:
            result.fail(f"node-{node + 1}'s chain does not verify: {verified[node]['error']}")
    # The record at each seq is the one most nodes hold; any other is a divergence.
    held_at: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for node, node_chain in enumerate(chains):
        for record in node_chain:
            held_at.setdefault(record["seq"], []).append((node, record))
    for seq, holders in sorted(held_at.items()):
        votes = Counter(r["hash"] for _, r in holders)
        winner = max(holders, key=lambda h: votes[h[1]["hash"]])[1]
        by_seq[seq] = winner
        for node, record in holders:
            if record["hash"] != winner["hash"]:
                diverged.add(node)
                diverged_ids[str(record["event"].get("requestID"))] = f"node-{node + 1}"
                result.fail(f"divergence: node-{node + 1} holds another record at seq {seq} "
                            f"than {votes[winner['hash']]} other node(s): {_brief(record)} "
                            f"instead of {_brief(winner)}")
    chain = [by_seq[seq] for seq in sorted(by_seq) if seq <= length]
    unheld = length - len(chain)
    if unheld:
        result.fail(f"{SEGMENT_GAP} no node holds {unheld} of the {length} records")
    for before, after in zip(chain, chain[1:], strict=False):
        if after["prev_hash"] != before["hash"] or after["seq"] != before["seq"] + 1:
            result.fail(f"chain link broken at seq {after['seq']}")
            break
    per_request = Counter(r["event"].get("requestID") for r in chain)
    answered: dict[str, bool] = {}  # request id -> its record may be missing
    asked: dict[str, str] = {}  # request id -> what it was, for the messages
    unanswered = 0
    for call in ledger.calls:
        for attempt in call.attempts:
            if attempt.request_id:
                answered[attempt.request_id] = attempt.unrecorded
                asked[attempt.request_id] = (
                    f"{call.op} to node-{call.node + 1} at {call.started:.3f}, answered "
                    f"{attempt.status} {attempt.error_code or ''}".strip())
            elif not attempt.answered:
                unanswered += 1
    exact = at_most_one = unverifiable = 0
    for request_id, may_be_missing in answered.items():
        count = per_request.get(request_id, 0)
        if count == 0 and request_id in diverged_ids:
            # Answered, yet its record is only in a node's diverged chain: not committed.
            result.fail(f"request {request_id} ({asked[request_id]}) has its record only in "
                        f"{diverged_ids[request_id]}'s diverged chain")
        elif count == 0 and unheld:
            unverifiable += 1  # it may be among the records no node's files hold
        elif may_be_missing:
            at_most_one += 1
            if count > 1:
                result.fail(f"request {request_id} has {count} audit records")
        else:
            exact += 1
            if count != 1:
                held = [f"node-{n + 1}" for n, chain_ in enumerate(chains)
                        if any(r["event"].get("requestID") == request_id for r in chain_)]
                result.fail(f"request {request_id} ({asked[request_id]}) has {count} audit "
                            f"records in the chain (segments holding it: {held})")
    unknown = [rid for rid in per_request if rid not in answered]
    for rid in unknown:
        if per_request[rid] > 1:
            result.fail(f"request {rid} has {per_request[rid]} audit records")
    if len(unknown) > unanswered:
        result.fail(f"{len(unknown)} records belong to no answered request, but only "
                    f"{unanswered} attempts went unanswered")
    result.counts.update({
        "records": length, "nodes": cluster.size,
        "records_per_node": [len([r for r in c if r["seq"] <= length]) for c in chains],
        "verified": [v["ok"] for v in verified], "segment_gaps": gaps,
        "diverged_nodes": sorted(f"node-{n + 1}" for n in diverged),
        "answered_requests": len(answered), "checked_exactly_one": exact,
        "checked_at_most_one (refused without quorum)": at_most_one,
        "of_those_without_record": sum(1 for rid, m in answered.items()
                                       if m and per_request.get(rid, 0) == 0),
        "records_without_an_answer": len(unknown), "unanswered_attempts": unanswered,
        "answered_but_not_checkable (record among those no node holds)": unverifiable})
    return result, chain


def _brief(record: dict[str, Any]) -> str:
    event = record["event"]
    return (f"{event.get('eventName')} {event.get('requestID')} by {record.get('node')} "
            f"at {event.get('eventTime')}")


# Writes.
def _outcomes(ledger: Ledger, op: str) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = defaultdict(list)
    for call in ledger.calls:
        if call.op == op:
            out[call.name.split("|")[0]].append(call)
    return out


def _may_be_applied(calls: list[Call]) -> int:
    """How many times the calls for one name may have been applied (attempts that were
    answered with success, a 5xx or not at all)."""
    return sum(1 for c in calls for a in c.attempts
               if a.status is None or a.status >= 500 or (a.status == 200))


def check_writes(cluster: Cluster, ledger: Ledger, prefix: str
                 ) -> tuple[CheckResult, list[str]]:
    """The writes check, and every key id any node lists."""
    result = CheckResult("writes")
    keys_by_name = _outcomes(ledger, "CreateKey")
    aliases_by_name = _outcomes(ledger, "CreateAlias")
    grants_by_name = _outcomes(ledger, "CreateGrant")
    clients = [make_client(cluster, n, attempts=5, read_timeout=30)[0]
               for n in range(cluster.size)]
    acked_keys = {c.key_id: name for name, calls in keys_by_name.items()
                  for c in calls if c.ok}
    per_node_keys: list[set[str]] = []
    key_descriptions: dict[str, str] = {}
    for node, client in enumerate(clients):
        listed = {k["KeyId"] for k in _paged(client.list_keys, "Keys", Limit=1000)}
        per_node_keys.append(listed)
        for key_id, name in acked_keys.items():
            if key_id not in listed:
                result.fail(f"acknowledged key {key_id} ({name}) missing on node-{node + 1}")
        for key_id in sorted(listed):
            meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
            description = meta.get("Description", "")
            previous = key_descriptions.setdefault(key_id, description)
            if previous != description:
                result.fail(f"key {key_id} has description {description!r} on node-{node + 1}"
                            f" but {previous!r} elsewhere")
    all_keys = set().union(*per_node_keys)
    for node, listed in enumerate(per_node_keys):
        if listed != per_node_keys[0]:
            result.fail(f"node-{node + 1} lists {len(listed)} keys, node-1 "
                        f"{len(per_node_keys[0])}: {sorted(listed ^ per_node_keys[0])[:5]}")
    found_by_name = Counter(key_descriptions.values())
    for description, count in found_by_name.items():
        attempted = keys_by_name.get(description)
        if attempted is None:
            result.fail(f"{count} key(s) with description {description!r} that no client "
                        "created")
        elif count > _may_be_applied(attempted):
            result.fail(f"{count} keys named {description!r}, but it was attempted "
                        f"{_may_be_applied(attempted)} time(s)")
    result.counts["keys"] = {
        "acknowledged": len(acked_keys), "present": len(all_keys),
        "unacknowledged_but_present": sum(1 for k, d in key_descriptions.items()
                                          if k not in acked_keys and d in keys_by_name),
        "attempted": sum(len(v) for v in keys_by_name.values())}

    # Aliases.
    acked_aliases = {}
    for name, calls in aliases_by_name.items():
        for call in calls:
            # AlreadyExists after a lost answer: the earlier attempt created it.
            if call.ok or (call.outcome == "AlreadyExistsException" and call.ambiguous):
                acked_aliases[name] = call.key_id
    present_aliases: dict[str, str] = {}
    for node, client in enumerate(clients):
        listed = {a["AliasName"]: a.get("TargetKeyId", "")
                  for a in _paged(client.list_aliases, "Aliases", Limit=100)}
        for name, target in acked_aliases.items():
            if listed.get(name) != target:
                result.fail(f"acknowledged alias {name} -> {target} is "
                            f"{listed.get(name, 'missing')!r} on node-{node + 1}")
        for name, target in listed.items():
            if name.startswith("alias/aws/"):
                continue
            if name not in aliases_by_name:
                result.fail(f"alias {name} on node-{node + 1} was created by no client")
            elif {c.key_id for c in aliases_by_name[name]} != {target}:
                result.fail(f"alias {name} points at {target}, not where it was asked to")
        if node == 0:
            present_aliases = listed
        elif listed != present_aliases:
            result.fail(f"node-{node + 1}'s aliases differ from node-1's")
    result.counts["aliases"] = {
        "acknowledged": len(acked_aliases),
        "present": sum(1 for a in present_aliases if a.startswith(f"alias/chaos-{prefix}")),
        "attempted": sum(len(v) for v in aliases_by_name.values())}

    # Grants: listed on every key, on every node.
    acked_grants = {c.name.split("|")[1]: (name, c.key_id)
                    for name, calls in grants_by_name.items() for c in calls if c.ok}
    grants_per_node: list[dict[str, tuple[str, str]]] = []
    for client in clients:
        found: dict[str, tuple[str, str]] = {}
        for key_id in sorted(all_keys):
            for grant in _paged(client.list_grants, "Grants", KeyId=key_id, Limit=100):
                found[grant["GrantId"]] = (grant.get("Name", ""), key_id)
        grants_per_node.append(found)
    for node, found in enumerate(grants_per_node):
        for grant_id, (name, key_id) in acked_grants.items():
            if found.get(grant_id) != (name, key_id):
                result.fail(f"acknowledged grant {grant_id} ({name}) on {key_id} is "
                            f"{found.get(grant_id)} on node-{node + 1}")
        if found != grants_per_node[0]:
            result.fail(f"node-{node + 1}'s grants differ from node-1's")
    grant_names = Counter(name for name, _ in grants_per_node[0].values())
    for name, count in grant_names.items():
        attempted = grants_by_name.get(name)
        if attempted is None:
            result.fail(f"{count} grant(s) named {name!r} that no client created")
        elif count > _may_be_applied(attempted):
            result.fail(f"{count} grants named {name!r}, attempted "
                        f"{_may_be_applied(attempted)} time(s)")
    result.counts["grants"] = {
        "acknowledged": len(acked_grants), "present": len(grants_per_node[0]),
        "attempted": sum(len(v) for v in grants_by_name.values())}
    result.counts["nodes_checked"] = cluster.size
    return result, sorted(all_keys)


def check_key_state(cluster: Cluster, ledger: Ledger) -> CheckResult:
    result = CheckResult("key_state")
    by_key: dict[str, list[Call]] = defaultdict(list)
    rotations: dict[str, list[Call]] = defaultdict(list)
    for call in ledger.calls:
        if call.op in ("DisableKey", "EnableKey"):
            by_key[call.key_id].append(call)
        elif call.op == "RotateKeyOnDemand":
            rotations[call.key_id].append(call)
    clients = [make_client(cluster, n, attempts=5, read_timeout=30)[0]
               for n in range(cluster.size)]
    checked_state = checked_rotations = 0
    for key_id, calls in by_key.items():
        if any(c.ambiguous for c in calls):
            continue  # an unanswered enable/disable may land at any later log position
        answered = [c for c in calls if c.ok]
        if not answered:
            continue
        expected = answered[-1].op == "EnableKey"
        checked_state += 1
        for node, client in enumerate(clients):
            enabled = client.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"]
            if enabled != expected:
                result.fail(f"key {key_id} is {'en' if enabled else 'dis'}abled on "
                            f"node-{node + 1}; its last answered change was {answered[-1].op}")
    for key_id, calls in rotations.items():
        low = sum(1 for c in calls if c.ok)
        # Any attempt that got a 5xx or no answer may have rotated too (a retried call's
        # first attempt included).
        high = low + sum(1 for c in calls for a in c.attempts
                         if a.status is None or a.status >= 500)
        checked_rotations += 1
        for node, client in enumerate(clients):
            listed = [r for r in _paged(client.list_key_rotations, "Rotations", KeyId=key_id)
                      if r.get("RotationType") == "ON_DEMAND"]
            if not low <= len(listed) <= high:
                result.fail(f"key {key_id} shows {len(listed)} on-demand rotations on "
                            f"node-{node + 1}; answered {low}, at most {high}")
    result.counts.update({"keys_state_checked": checked_state,
                          "keys_rotations_checked": checked_rotations})
    return result


def check_ciphertexts(cluster: Cluster, ledger: Ledger, all_keys: list[str]) -> CheckResult:
    """Enable every key, then decrypt every blob, spreading them over the nodes."""
    result = CheckResult("ciphertexts")
    admin, _ = make_client(cluster, 0, attempts=5, read_timeout=30)
    for key_id in sorted({s.key_id for s in ledger.sealed} | set(all_keys)):
        admin.enable_key(KeyId=key_id)
    wait_same_heads(cluster)
    lock = threading.Lock()
    decrypted = Counter()

    def check(node: int, items: list[Sealed]) -> None:
        client, _ = make_client(cluster, node, attempts=5, read_timeout=30)
        for sealed in items:
            try:
                plaintext = client.decrypt(CiphertextBlob=sealed.ciphertext,
                                           EncryptionContext=sealed.context)["Plaintext"]
            except (ClientError, BotoCoreError) as error:
                with lock:
                    result.fail(f"{sealed.source} blob under {sealed.key_id} does not decrypt "
                                f"on node-{node + 1}: {error}")
                continue
            with lock:
                decrypted[sealed.source] += 1
                if plaintext != sealed.plaintext:
                    result.fail(f"{sealed.source} blob under {sealed.key_id} decrypts to other"
                                f" bytes on node-{node + 1}")

    items = list(ledger.sealed)
    # Several callers per node: concurrent requests share audit batches (group commit).
    lanes = cluster.size * 3
    threads = [threading.Thread(target=check, args=(lane % cluster.size, items[lane::lanes]))
               for lane in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for message in ledger.violations:
        result.fail(message)
    result.counts.update({"blobs": len(items), "decrypted_ok": dict(decrypted),
                          "in_run_decrypt_mismatches": len(ledger.violations)})
    return result


# Availability.
def phase_of(windows: list[FaultWindow], at: float) -> str:
    starts = [w.injected for w in windows]
    i = bisect.bisect_right(starts, at) - 1
    if i >= 0:
        window = windows[i]
        end = window.recovered or window.healed
        if at <= end:
            return window.kind
    return "none"


def availability(ledger: Ledger, windows: list[FaultWindow]) -> dict[str, Any]:
    per: dict[str, Counter] = defaultdict(Counter)
    for call in ledger.calls:
        phase = phase_of(windows, call.started)
        per[phase][call.status] += 1
        per[phase]["calls"] += 1
        per[phase]["write_calls" if call.op in WRITE_OPS else "crypto_calls"] += 1
        if call.ok:
            per[phase]["write_ok" if call.op in WRITE_OPS else "crypto_ok"] += 1
    out = {}
    for phase, counts in sorted(per.items()):
        total = counts["calls"]
        out[phase] = {
            "calls": total, "ok": counts["ok"], "refused_4xx": counts["refused"],
            "unavailable": counts["unavailable"],
            "success_share": round(counts["ok"] / total, 4) if total else None,
            "served_share": round((counts["ok"] + counts["refused"]) / total, 4)
            if total else None,
            "write_success_share": round(counts["write_ok"] / counts["write_calls"], 4)
            if counts["write_calls"] else None,
            "crypto_success_share": round(counts["crypto_ok"] / counts["crypto_calls"], 4)
            if counts["crypto_calls"] else None,
        }
    return out


def longest_write_gap(ledger: Ledger, windows: list[FaultWindow], start: float,
                      end: float) -> dict[str, Any]:
    times = sorted(c.ended for c in ledger.calls if c.ok and c.op in WRITE_OPS)
    points = [start, *[t for t in times if start <= t <= end], end]
    best = (0.0, start, start)
    for a, b in zip(points, points[1:], strict=False):
        if b - a > best[0]:
            best = (b - a, a, b)
    gap, a, b = best
    during = sorted({w.kind for w in windows
                     if w.injected <= b and (w.recovered or w.healed) >= a})
    return {"seconds": round(gap, 2), "from_s": round(a - start, 2), "to_s": round(b - start, 2),
            "faults_overlapping": during, "successful_writes": len(times)}
