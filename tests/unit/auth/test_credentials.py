"""Unsealed secrets and callers are kept per access key only while its record stands."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict, CIMultiDictProxy

from cluster.state import AccessKeyRecord, KmsState
from kmsd.api.protocol import Authenticator
from kmsd.auth.credentials import CredentialStore, secret_aad
from kmsd.auth.sigv4 import SigV4Verifier
from kmsd.errors import InvalidSignatureException, UnrecognizedClientException
from kmsd.hsm.partition import HsmAuthenticationFailed

ACCOUNT = "111122223333"
AK = "AKIAEXAMPLE000000001"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"


class FakeHsm:
    """Seals by prefixing; counts unseals."""

    def __init__(self) -> None:
        self.unseals = 0

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        self.unseals += 1
        prefix = b"sealed|" + aad + b"|"
        if not blob.startswith(prefix):
            raise HsmAuthenticationFailed("wrong aad")
        return blob[len(prefix):]


def sealed(secret: str, access_key_id: str = AK) -> bytes:
    return b"sealed|" + secret_aad(access_key_id) + b"|" + secret.encode()


def put_key(state: KmsState, secret: str, principal: str = ROOT) -> None:
    state.access_keys[AK] = AccessKeyRecord(AK, principal, ACCOUNT, sealed(secret), 0.0)


@pytest.fixture
def store() -> tuple[KmsState, FakeHsm, CredentialStore]:
    state, hsm = KmsState(), FakeHsm()
    return state, hsm, CredentialStore(state, hsm)  # type: ignore[arg-type]


def test_a_secret_is_unsealed_once_and_its_caller_made_once(store) -> None:
    state, hsm, credentials = store
    put_key(state, "s1")
    assert [credentials.secret_for(AK) for _ in range(3)] == ["s1"] * 3
    assert hsm.unseals == 1
    assert credentials.caller_for(AK) is credentials.caller_for(AK)
    assert credentials.caller_for(AK).principal_arn == ROOT


def test_a_deleted_access_key_has_no_secret_and_no_caller(store) -> None:
    state, _hsm, credentials = store
    put_key(state, "s1")
    assert credentials.secret_for(AK) == "s1"
    del state.access_keys[AK]
    assert credentials.secret_for(AK) is None
    with pytest.raises(KeyError):
        credentials.caller_for(AK)


def test_a_replaced_access_key_is_read_again(store) -> None:
    state, hsm, credentials = store
    put_key(state, "s1")
    assert credentials.secret_for(AK) == "s1"
    put_key(state, "s2", ALICE)
    assert credentials.secret_for(AK) == "s2"
    assert credentials.caller_for(AK).principal_arn == ALICE
    # The same secret under a new record (say, re-sealed) is unsealed again, not trusted.
    state.access_keys[AK] = AccessKeyRecord(AK, ALICE, ACCOUNT, b"sealed|forged|s2", 0.0)
    assert credentials.secret_for(AK) is None
    assert hsm.unseals == 3


def test_after_a_rotation_the_old_secret_no_longer_signs(store) -> None:
    state, _hsm, credentials = store
    put_key(state, "old-secret")
    authenticator = Authenticator(SigV4Verifier("kms", frozenset({"us-east-1"})), credentials)

    def request(secret: str):
        body = json.dumps({"KeyId": "alias/x"}).encode()
        signed = AWSRequest(method="POST", url="https://kms.example/", data=body, headers={
            "X-Amz-Target": "TrentService.Decrypt",
            "Content-Type": "application/x-amz-json-1.1"})
        SigV4Auth(Credentials(AK, secret), "kms", "us-east-1").add_auth(signed)
        headers = [("Host", "kms.example"), *signed.prepare().headers.items()]
        received = CIMultiDictProxy(CIMultiDict(headers))
        return make_mocked_request("POST", "/", headers=received), body

    assert authenticator.authenticate(*request("old-secret"))[0].principal_arn == ROOT
    put_key(state, "new-secret")
    with pytest.raises(InvalidSignatureException):
        authenticator.authenticate(*request("old-secret"))
    assert authenticator.authenticate(*request("new-secret"))[1] == "us-east-1"
    del state.access_keys[AK]
    with pytest.raises(UnrecognizedClientException):
        authenticator.authenticate(*request("new-secret"))

