"""`kmsctl`: the operator's command line, over a node's admin API.

The admin endpoint comes from `--endpoint` or KMSD_ADMIN_ENDPOINT; requests
are signed with SigV4 from the standard AWS credential environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class AdminClient:
    def __init__(self, endpoint: str, region: str, credentials: Credentials) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.credentials = credentials

    def get(self, path: str, endpoint: str | None = None) -> dict[str, Any]:
        return self.call("GET", path, endpoint=endpoint)

    def call(self, method: str, path: str, body: bytes = b"",
             endpoint: str | None = None) -> dict[str, Any]:
        with self.open(method, path, body, endpoint) as response:
            return json.loads(response.read())

    def open(self, method: str, path: str, body: bytes = b"",
             endpoint: str | None = None, timeout: float = 30) -> Any:
        url = (endpoint or self.endpoint).rstrip("/") + path
        request = AWSRequest(method=method, url=url, data=body)
        SigV4Auth(self.credentials, "kms", self.region).add_auth(request)
        prepared = request.prepare()
        http_request = urllib.request.Request(url, data=body or None,
                                              headers=dict(prepared.headers), method=method)
        try:
            return urllib.request.urlopen(http_request, timeout=timeout)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
            raise SystemExit(f"kmsctl: {body.get('__type', error.code)}: "
                             f"{body.get('message', '')}") from None


def _client(args: argparse.Namespace) -> AdminClient:
    endpoint = args.endpoint or os.environ.get("KMSD_ADMIN_ENDPOINT")
    if not endpoint:
        raise SystemExit("kmsctl: give --endpoint or set KMSD_ADMIN_ENDPOINT")
    access_key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret:
        raise SystemExit("kmsctl: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION") or "us-east-1"
    return AdminClient(endpoint, region, Credentials(access_key, secret,
                                                     os.environ.get("AWS_SESSION_TOKEN")))


def cluster_status(client: AdminClient) -> dict[str, Any]:
    members = client.get("/v1/cluster/members")["members"]
    nodes = []
    for member in sorted(members, key=lambda m: m["node_id"]):
        try:
            status = client.get("/v1/node/status", endpoint=member["admin_url"])
        except (urllib.error.URLError, OSError):
            status = None
        raft = (status or {}).get("raft", {})
        nodes.append({
            "node_id": member["node_id"], "az": member["az"], "api_url": member["api_url"],
            "raft_address": member["raft_address"],
            "reachable": status is not None,
            "role": raft.get("role", "unreachable"), "term": raft.get("term"),
            "commit_index": raft.get("commit_index"), "applied_index": raft.get("applied_index"),
            "lag": (max(0, (raft.get("leader_commit_index") or 0)
                        - (raft.get("applied_index") or 0)) if raft else None),
            "last_contact": "now" if status is not None else "unreachable",
            "ready": (status or {}).get("ready"),
            "token_label": (status or {}).get("hsm", {}).get("token_label"),
            "domain_key_check": (status or {}).get("hsm", {}).get("domain_key_check"),
        })
    return {"members": nodes, "warnings": az_warnings(nodes)}


def az_warnings(nodes: list[dict[str, Any]]) -> list[str]:
    """A majority of voters in one AZ means losing that AZ loses the cluster."""
    by_az: dict[str, list[str]] = {}
    for node in nodes:
        by_az.setdefault(node["az"], []).append(node["node_id"])
    majority = len(nodes) // 2 + 1
    return [f"AZ {az} holds {len(ids)} of {len(nodes)} voters ({', '.join(ids)}): a majority; "
            "losing that AZ stops the cluster" for az, ids in sorted(by_az.items())
            if len(nodes) > 1 and len(ids) >= majority]


def _print_status(status: dict[str, Any]) -> None:
    columns = ("node_id", "az", "role", "term", "commit_index", "applied_index", "lag",
               "ready", "token_label", "domain_key_check", "last_contact")
    rows = [[str(node.get(c)) for c in columns] for node in status["members"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for warning in status["warnings"]:
        print(f"WARNING: {warning}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmsctl", description=__doc__)
    parser.add_argument("--endpoint", help="a node's admin endpoint (or KMSD_ADMIN_ENDPOINT)")
    parser.add_argument("--region", help="signing region (default: AWS_REGION or us-east-1)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="group", required=True)
    cluster = sub.add_parser("cluster").add_subparsers(dest="action", required=True)
    cluster.add_parser("status", help="members, AZ, role, term, commit index")
    token = cluster.add_parser("join-token", help="a one-time token for kmsd join")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    snapshot = sub.add_parser("snapshot", help="state backups").add_subparsers(
        dest="action", required=True)
    save = snapshot.add_parser("save", help="write the replicated state (key material "
                                            "stays wrapped) to FILE")
    save.add_argument("file")
    remove = cluster.add_parser("remove", help="remove a member from the cluster")
    remove.add_argument("node_id")

    principal = sub.add_parser("principal", help="users and roles").add_subparsers(
        dest="action", required=True)
    for action in ("create", "delete"):
        cmd = principal.add_parser(action)
        cmd.add_argument("kind", choices=("user", "role"))
        cmd.add_argument("name")
    principal.add_parser("list")

    access_key = sub.add_parser("access-key", help="access keys").add_subparsers(
        dest="action", required=True)
    create_key = access_key.add_parser("create", help="prints the secret once")
    create_key.add_argument("kind", choices=("user", "role"))
    create_key.add_argument("name")
    delete_key = access_key.add_parser("delete")
    delete_key.add_argument("access_key_id")

    policy = sub.add_parser("policy", help="identity policies").add_subparsers(
        dest="action", required=True)
    attach = policy.add_parser("attach")
    detach = policy.add_parser("detach")
    for cmd in (attach, detach):
        cmd.add_argument("kind", choices=("user", "role"))
        cmd.add_argument("name")
        cmd.add_argument("policy_name")
    attach.add_argument("--file", required=True, help="the policy document ('-' for stdin)")

    audit = sub.add_parser("audit", help="the audit chain").add_subparsers(
        dest="action", required=True)
    verify = audit.add_parser("verify", help="check a node's whole chain; names the first "
                                             "bad record")
    export = audit.add_parser("export", help="write JSONL, one CloudTrail-shaped event a line")
    tail = audit.add_parser("tail", help="follow new records")
    audit.add_parser("digest", help="sign the chain head now (HSM-held ECDSA key)")
    audit.add_parser("public-key", help="the digest signing public key (DER, base64)")
    for cmd in (verify, export, tail, *(audit.choices[n] for n in ("digest", "public-key"))):
        cmd.add_argument("--node", help="node id (default: the --endpoint node)")
    export.add_argument("--since", help="ISO-8601 time, inclusive")
    export.add_argument("--until", help="ISO-8601 time, exclusive")
    export.add_argument("--event", help="only this eventName, e.g. Decrypt")
    export.add_argument("--out", required=True, help="output file ('-' for stdout)")
    tail.add_argument("--count", type=int, default=0, help="stop after this many records")
    tail.add_argument("--from-start", action="store_true", help="print existing records too")

    hsm = sub.add_parser("hsm", help="the node's HSM token").add_subparsers(
        dest="action", required=True)
    capabilities = hsm.add_parser("capabilities", help="which path each KMS key spec and "
                                                       "algorithm takes on the token")
    capabilities.add_argument("--node", help="node id (default: the --endpoint node)")

    domain = sub.add_parser("domain", help="domain-key generations and their rotation"
                            ).add_subparsers(dest="action", required=True)
    rotate = domain.add_parser("rotate", help="new domain key in every HSM, re-wrap every "
                                              "stored key under it, destroy the old one")
    rotate.add_argument("--no-wait", action="store_true",
                        help="return once the rotation is requested")
    rotate.add_argument("--timeout", type=float, default=3600,
                        help="seconds to wait for the rotation to finish")
    domain.add_parser("status", help="generations, how many blobs each wraps, what each "
                                     "member's token holds")

    args = parser.parse_args(argv)
    client = _client(args)
    if args.group == "domain":
        return _domain(client, args)
    if args.group == "audit":
        return _audit(client, args)
    if args.group == "snapshot":
        with client.open("GET", "/v1/snapshot") as response:
            data = response.read()
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        print(json.dumps({"file": args.file, "bytes": len(data)}))
        return 0
    if args.group == "hsm":
        return _hsm_capabilities(client, args)
    result = _run(client, args)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _hsm_capabilities(client: AdminClient, args: argparse.Namespace) -> int:
    report = client.get("/v1/hsm/capabilities", endpoint=_node_endpoint(client, args.node))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"token {report['token_label']!r}: {report['token_manufacturer']} "
          f"{report['token_model']} (firmware {report['token_firmware']}), {report['library']}")
    columns = ("kind", "name", "path", "detail")
    rows = [[str(entry[c]) for c in columns] for entry in report["capabilities"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, [*widths, 0], strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, [*widths, 0], strict=True)).rstrip())
    helper = report["helper_process"]
    if helper["enabled"]:
        print("HSM helper process (off the event loop): " + "; ".join(helper["runs"]))
    return 0


def _print_domain(status: dict[str, Any]) -> None:
    print(f"phase: {status['Phase']}   active generation: {status['ActiveGeneration']}"
          + (f"   leader: {status['LeaderProgress']}" if status.get("LeaderProgress") else ""))
    for generation in status["Generations"]:
        print(f"  generation {generation['Generation']}: {generation['State']:<9} check "
              f"{generation['Check']}  blobs {generation['Blobs']}")
    for member in status["Members"]:
        held = (", ".join(f"{n}" for n in sorted(member["Held"], key=int))
                if member["Held"] is not None else "unreachable")
        print(f"  {member['NodeId']}: holds generation(s) {held}")


def _domain(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "status":
        status = client.get("/v1/domain")
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_domain(status)
        return 0
    status = client.call("POST", "/v1/domain/rotate")
    print("rotation requested" if status["Started"] else "a rotation is already running",
          flush=True)
    deadline = time.monotonic() + args.timeout
    last = ""
    while not args.no_wait:
        # Requested -> cloning -> re-wrapping -> destroying -> idle, with every member holding
        # exactly the live generations.
        line = (f"{status['Phase']}: "
                + "; ".join(f"generation {g['Generation']} {g['State']} ({g['Blobs']} blobs)"
                            for g in status["Generations"]
                            if g["State"] not in ("retired", "abandoned") or g["Blobs"]))
        if status.get("LeaderProgress"):
            line += f" [{status['LeaderProgress']}]"
        if line != last:
            print(line, flush=True)
            last = line
        if not status["InProgress"]:
            break
        if time.monotonic() > deadline:
            print("kmsctl: the rotation has not finished; it goes on in the cluster "
                  "(kmsctl domain status)", file=sys.stderr)
            return 1
        time.sleep(1)
        status = client.get("/v1/domain")
    if args.json:
        print(json.dumps(status, indent=2))
    elif not args.no_wait:
        _print_domain(status)
    return 0


def _node_endpoint(client: AdminClient, node: str | None) -> str | None:
    if node is None:
        return None
    for member in client.get("/v1/cluster/members")["members"]:
        if member["node_id"] == node:
            return member["admin_url"]
    raise SystemExit(f"kmsctl: no member named {node}")


def _audit(client: AdminClient, args: argparse.Namespace) -> int:
    endpoint = _node_endpoint(client, args.node)
    if args.action == "verify":
        result = client.call("GET", "/v1/audit/verify", endpoint=endpoint)
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            error = result["error"] or {}
            print(f"kmsctl: audit chain broken at seq {error.get('seq')} "
                  f"({error.get('file')}:{error.get('line')}): {error.get('message')}"
                  if error else f"kmsctl: audit chain incomplete: {result['segment_gap']}",
                  file=sys.stderr)
            return 1
        return 0
    if args.action == "digest":
        print(json.dumps(client.call("POST", "/v1/audit/digest", endpoint=endpoint), indent=2))
        return 0
    if args.action == "public-key":
        print(json.dumps(client.get("/v1/audit/public-key", endpoint=endpoint), indent=2))
        return 0
    if args.action == "export":
        query = urllib.parse.urlencode({k: v for k, v in (
            ("since", args.since), ("until", args.until), ("event", args.event)) if v})
        out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
        written = 0
        try:
            with client.open("GET", f"/v1/audit/export?{query}", endpoint=endpoint,
                             timeout=300) as response:
                for raw in response:
                    out.write(raw.decode("utf-8"))
                    written += 1
                    if written % 1000 == 0:
                        print(f"\rexported {written} events", end="", file=sys.stderr)
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"\rexported {written} events", file=sys.stderr)
        return 0
    after = 0
    if not args.from_start:
        verify = client.call("GET", "/v1/audit/verify", endpoint=endpoint)
        after = verify["expected_head"]["seq"]
    printed = 0
    while True:
        records = client.call("GET", f"/v1/audit/records?after={after}&limit=500",
                              endpoint=endpoint)["Records"]
        for record in records:
            print(json.dumps(record), flush=True)
            after = record["seq"]
            printed += 1
            if args.count and printed >= args.count:
                return 0
        if not records:
            time.sleep(1)


def _run(client: AdminClient, args: argparse.Namespace) -> dict[str, Any] | None:
    if args.group == "cluster" and args.action == "join-token":
        return client.call("POST", "/v1/cluster/join-tokens",
                           json.dumps({"TtlSeconds": args.ttl}).encode())
    if args.group == "cluster" and args.action == "remove":
        return client.call("POST", "/v1/cluster/remove",
                           json.dumps({"NodeId": args.node_id}).encode())
    if args.group == "cluster":
        status = cluster_status(client)
        if args.json:
            return status
        _print_status(status)
        return None
    if args.group == "principal":
        if args.action == "list":
            return client.get("/v1/principals")
        if args.action == "create":
            body = json.dumps({"Kind": args.kind, "Name": args.name}).encode()
            return client.call("POST", "/v1/principals", body)
        return client.call("DELETE", f"/v1/principals/{args.kind}/{args.name}")
    if args.group == "access-key":
        if args.action == "create":
            return client.call("POST", f"/v1/principals/{args.kind}/{args.name}/access-keys")
        return client.call("DELETE", f"/v1/access-keys/{args.access_key_id}")
    path = f"/v1/principals/{args.kind}/{args.name}/policies/{args.policy_name}"
    if args.action == "attach":
        if args.file == "-":
            document = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as handle:
                document = handle.read()
        return client.call("PUT", path, document.encode())
    return client.call("DELETE", path)


if __name__ == "__main__":
    sys.exit(main())
