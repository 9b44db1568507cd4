"""SigV4 on every request, against a real node: AWS error types for each failure."""

from __future__ import annotations

import datetime
import json
import urllib.error
import urllib.request
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster


def _post(cluster: Cluster, target: str, body: dict, credentials: Credentials | None,
          signed_at: datetime.datetime | None = None) -> tuple[int, dict]:
    url = cluster.info["endpoints"][0] + "/"
    request = AWSRequest(method="POST", url=url, data=json.dumps(body).encode(), headers={
        "X-Amz-Target": f"TrentService.{target}",
        "Content-Type": "application/x-amz-json-1.1"})
    if credentials is not None:
        if signed_at is None:
            SigV4Auth(credentials, "kms", cluster.region).add_auth(request)
        else:
            # botocore reads the time through this function; sign as of another moment.
            naive = signed_at.astimezone(datetime.UTC).replace(tzinfo=None)
            with mock.patch("botocore.auth.get_current_datetime", return_value=naive):
                SigV4Auth(credentials, "kms", cluster.region).add_auth(request)
    prepared = request.prepare()
    http = urllib.request.Request(url, data=prepared.body, headers=dict(prepared.headers),
                                  method="POST")
    try:
        with urllib.request.urlopen(http, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_wrong_secret_is_invalid_signature(cluster: Cluster) -> None:
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0, secret_access_key="wrong" * 8, retries=1).list_keys()
    assert excinfo.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert excinfo.value.response["Error"]["Message"].startswith(
        "The request signature we calculated does not match the signature you provided.")


def test_unknown_access_key_is_unrecognized_client(cluster: Cluster) -> None:
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1, access_key_id="AKIAUNKNOWNUNKNOWN00", retries=1).list_keys()
    assert excinfo.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert (excinfo.value.response["Error"]["Message"]
            == "The security token included in the request is invalid.")


def test_expired_signature_is_refused_with_awss_message(cluster: Cluster) -> None:
    signed_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    status, body = _post(cluster, "ListKeys", {}, cluster.credentials(), signed_at)
    assert status == 400
    assert body["__type"] == "InvalidSignatureException"
    assert body["message"].startswith(f"Signature expired: {signed_at:%Y%m%dT%H%M%SZ} is now "
                                      "earlier than ")
    assert body["message"].endswith(" - 5 min.)")


def test_future_signature_is_refused(cluster: Cluster) -> None:
    signed_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
    status, body = _post(cluster, "ListKeys", {}, cluster.credentials(), signed_at)
    assert (status, body["__type"]) == (400, "InvalidSignatureException")
    assert body["message"].startswith("Signature not yet current")


def test_unsigned_request_is_refused(cluster: Cluster) -> None:
    status, body = _post(cluster, "ListKeys", {}, None)
    assert body["__type"] == "MissingAuthenticationTokenException"
    assert 400 <= status < 500


def test_signature_within_skew_is_accepted(cluster: Cluster) -> None:
    signed_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=3)
    status, body = _post(cluster, "ListKeys", {}, cluster.credentials(), signed_at)
    assert status == 200 and "Keys" in body


def test_unknown_target_and_bad_json(cluster: Cluster) -> None:
    status, body = _post(cluster, "NoSuchOperation", {}, cluster.credentials())
    assert (status, body["__type"]) == (400, "UnknownOperationException")
    url = cluster.info["endpoints"][0] + "/"
    request = AWSRequest(method="POST", url=url, data=b"{not json", headers={
        "X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(cluster.credentials(), "kms", cluster.region).add_auth(request)
    prepared = request.prepare()
    http = urllib.request.Request(url, data=prepared.body, headers=dict(prepared.headers),
                                  method="POST")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(http, timeout=5)
    assert excinfo.value.code == 400
    assert json.loads(excinfo.value.read())["__type"] == "SerializationException"
