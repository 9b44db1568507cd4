"""Access keys: from the replicated state to a verified caller.

Secrets are stored in the state only sealed under the domain key (AES-GCM in
the HSM, the access key id as AAD). A node unseals a secret the first time it
sees the access key and keeps it in memory to verify SigV4 signatures; the
plaintext secret is never logged or written anywhere.
"""

from __future__ import annotations

from cluster.state import AccessKeyRecord, KmsState
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmPartition
from kmsd.service.context import Caller


def secret_aad(access_key_id: str) -> bytes:
    return b"kmsd access key secret v1:" + access_key_id.encode("ascii")


class CredentialStore:
    def __init__(self, state: KmsState, hsm: HsmPartition) -> None:
        self._state = state
        self._hsm = hsm
        # Access key id -> (the record it was read from, its secret, its caller). An entry
        # holds only while the state still has that very record: any change to an access
        # key (deleted, re-created, re-sealed) replaces its frozen record object.
        self._known: dict[str, tuple[AccessKeyRecord, str, Caller]] = {}

    def secret_for(self, access_key_id: str) -> str | None:
        record = self._state.access_keys.get(access_key_id)
        if record is None:
            return None
        cached = self._known.get(access_key_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        try:
            secret = self._hsm.unseal(record.wrapped_secret, secret_aad(access_key_id)).decode()
        except HsmAuthenticationFailed:
            return None
        self._known[access_key_id] = (
            record, secret, Caller(access_key_id, record.principal_arn, record.account_id))
        return secret

    def caller_for(self, access_key_id: str) -> Caller:
        record = self._state.access_keys[access_key_id]
        cached = self._known.get(access_key_id)
        if cached is not None and cached[0] is record:
            return cached[2]  # one Caller per access key rather than one per request
        return Caller(access_key_id, record.principal_arn, record.account_id)
