"""No plaintext that was encrypted, and no data key returned, is ever written to a node's disk."""

from __future__ import annotations

import os
import uuid

from tests.integration.harness import Cluster, stored_views


def _files_under(root: str) -> list[str]:
    paths = []
    for directory, _, names in os.walk(root):
        paths.extend(os.path.join(directory, name) for name in names)
    return paths


def test_no_plaintext_or_data_key_in_any_data_dir_or_log(cluster: Cluster) -> None:
    secrets = list(cluster.secrets_seen)
    for node in range(cluster.size):
        client = cluster.client(node)
        key = client.create_key()["KeyMetadata"]["KeyId"]
        for _ in range(10):
            plaintext = b"top secret " + uuid.uuid4().hex.encode()
            blob = client.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
            assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
            data_key = client.generate_data_key(KeyId=key, KeySpec="AES_256")["Plaintext"]
            secrets += [plaintext, data_key]
    secret_key = cluster.info["secret_access_key"].encode()
    files = _files_under(cluster.data_dir)
    assert any(path.endswith("raft.journal") for path in files)
    assert any(path.endswith("node.log") for path in files)
    for path in files:
        for content in stored_views(path):
            for secret in secrets:
                assert secret not in content, f"a plaintext or data key is in {path}"
            assert secret_key not in content, f"the secret access key is in {path}"
