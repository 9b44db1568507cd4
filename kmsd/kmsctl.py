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
import urllib.error
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
        url = (endpoint or self.endpoint).rstrip("/") + path
        request = AWSRequest(method="GET", url=url, data=b"")
        SigV4Auth(self.credentials, "kms", self.region).add_auth(request)
        prepared = request.prepare()
        http_request = urllib.request.Request(url, headers=dict(prepared.headers), method="GET")
        try:
            with urllib.request.urlopen(http_request, timeout=5) as response:
                return json.loads(response.read())
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
            "ready": (status or {}).get("ready"),
            "token_label": (status or {}).get("hsm", {}).get("token_label"),
            "domain_key_check": (status or {}).get("hsm", {}).get("domain_key_check"),
        })
    return {"members": nodes}


def _print_status(status: dict[str, Any]) -> None:
    columns = ("node_id", "az", "role", "term", "commit_index", "applied_index", "ready",
               "domain_key_check")
    rows = [[str(node.get(c)) for c in columns] for node in status["members"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmsctl", description=__doc__)
    parser.add_argument("--endpoint", help="a node's admin endpoint (or KMSD_ADMIN_ENDPOINT)")
    parser.add_argument("--region", help="signing region (default: AWS_REGION or us-east-1)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="group", required=True)
    cluster = sub.add_parser("cluster").add_subparsers(dest="action", required=True)
    cluster.add_parser("status", help="members, AZ, role, term, commit index")
    args = parser.parse_args(argv)
    client = _client(args)
    if args.group == "cluster" and args.action == "status":
        status = cluster_status(client)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
