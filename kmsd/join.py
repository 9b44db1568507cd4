"""`kmsd join`: prepare a new node to join a running cluster, HSM to HSM.

The new node's token makes a transport key pair; the member named by --via
wraps every domain-key generation in use (and seals the cluster's Raft
secret) to it, records the new node and adds it to the Raft membership. This
command then unwraps the domain keys into the token, checks their check
values, writes the Raft secret to the configured password file (0600) and
the member list to the data dir.
Start the node with `kmsd serve` afterwards.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

from kmsd.config import ConfigError, NodeConfig
from kmsd.hsm import domain_clone
from kmsd.hsm.partition import HsmPartition


def _post(url: str, body: dict[str, Any], ca_bundle: str | None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None
    try:
        with urllib.request.urlopen(request, timeout=90, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}")
        raise ConfigError(f"join refused: {detail.get('__type')}: {detail.get('message')}") \
            from None


def join(config: NodeConfig, partition: HsmPartition, token: str, via: str,
         ca_bundle: str | None = None) -> dict[str, Any]:
    if not config.raft_password.file:
        raise ConfigError("kmsd join writes the cluster secret to raft.password_file: set it")
    point = None if partition.has_domain_key() else domain_clone.make_transport_key(partition)
    answer = _post(via.rstrip("/") + "/v1/cluster/join", {
        "Token": token, "NodeId": config.node_id, "Az": config.az,
        "RaftAddress": config.raft_address, "ApiUrl": config.public_url,
        "AdminUrl": config.admin_url, "TransportPoint": point.hex() if point else None,
        "DomainKeyCheck": None if point else partition.domain_key_check_value()},
        ca_bundle)
    if point is not None:
        secret = domain_clone.accept_domain_keys(
            partition, bytes.fromhex(answer["DonorPoint"]),
            {int(n): bytes.fromhex(w) for n, w in answer["WrappedDomainKeys"].items()},
            bytes.fromhex(answer["SealedSecret"]))
        fd = os.open(config.raft_password.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
    held = partition.held_generations()
    for number, expected in sorted(answer["DomainGenerations"].items()):
        if held.get(int(number)) != expected:
            raise ConfigError(f"this token's domain key of generation {number} "
                              f"({held.get(int(number))}) is not the cluster's ({expected}); "
                              "the node will not serve")
    check = answer["DomainKeyCheck"]
    os.makedirs(config.data_dir, exist_ok=True)
    with open(os.path.join(config.data_dir, "raft-peers.json"), "w", encoding="utf-8") as out:
        json.dump([*answer["Peers"], config.raft_address], out)
    return {"node_id": config.node_id, "joined": True, "domain_key_check": check,
            "peers": answer["Peers"]}
