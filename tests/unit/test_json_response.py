"""The JSON answer of the AWS JSON 1.1 protocol."""

from __future__ import annotations

import base64
import json

import pytest

from kmsd.api.protocol import CONTENT_TYPE, json_response


def test_json_response_encodes_blobs_anywhere_as_base64() -> None:
    body = {"KeyId": "k", "Plaintext": b"\x00\xff", "Nested": {"List": [b"a", ("t", 1.5)]},
            "Text": "é\u2028", "Nothing": None}
    response = json_response(body, "rid", 201)
    assert (response.status, response.content_type) == (201, CONTENT_TYPE)
    assert response.headers["x-amzn-RequestId"] == "rid"
    assert response.body == json.dumps(
        {"KeyId": "k", "Plaintext": base64.b64encode(b"\x00\xff").decode(),
         "Nested": {"List": [base64.b64encode(b"a").decode(), ["t", 1.5]]},
         "Text": "é\u2028", "Nothing": None}, separators=(",", ":")).encode()


def test_json_response_refuses_what_json_cannot_carry_and_keeps_working() -> None:
    with pytest.raises(TypeError):
        json_response({"Bad": [object()]}, "rid")
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises((ValueError, RecursionError)):
        json_response({"Loop": cyclic}, "rid")
    assert json_response({"Ok": [1]}, "rid").body == b'{"Ok":[1]}'
