"""A minimal single-process Decrypt server: the reference for what kmsd's architecture costs.

SigV4 verification (signing key cached per secret and day), AWS JSON 1.1,
and AES-256-GCM through SoftHSM2 via python-pkcs11, called inline on the event
loop. No Raft, no audit, no policy, no request validation beyond what the
three operations need, one key. Its ciphertext blob has kmsd's 34-byte header
layout, so the requests it is sent are the same size as kmsd's.

    SOFTHSM2_CONF=... BENCH_PIN=... BENCH_SECRET=... \
        python bench/minimal_server.py --port 8080 --token-label bench --access-key-id AKIA...

Prints one JSON line {"key_id": ...} on stdout once it listens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import time
import uuid
from datetime import UTC, datetime

import pkcs11
from aiohttp import web
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
from pkcs11.mechanisms import GCMParams

CONTENT_TYPE = "application/x-amz-json-1.1"
ACCOUNT = "111122223333"
_HEADER = struct.Struct(">BB16sI12s")


class Refused(Exception):
    def __init__(self, status: int, kind: str, message: str = "") -> None:
        super().__init__(kind)
        self.status, self.kind, self.message = status, kind, message


class SigV4:
    def __init__(self, access_key_id: str, secret: str, region: str) -> None:
        self.access_key_id, self.secret, self.region = access_key_id, secret, region
        self._keys: dict[str, bytes] = {}

    def _key(self, date: str) -> bytes:
        key = self._keys.get(date)
        if key is None:
            key = f"AWS4{self.secret}".encode()
            for part in (date, self.region, "kms", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys[date] = key
        return key

    def verify(self, request: web.Request, body: bytes) -> None:
        auth = request.headers.get("Authorization", "")
        algorithm, _, rest = auth.partition(" ")
        if algorithm != "AWS4-HMAC-SHA256":
            raise Refused(400, "MissingAuthenticationTokenException")
        params = dict(p.strip().split("=", 1) for p in rest.split(",") if "=" in p)
        try:
            key_id, date, region, service, term = params["Credential"].split("/")
            signed = params["SignedHeaders"].split(";")
            signature = params["Signature"]
        except (KeyError, ValueError):
            raise Refused(400, "IncompleteSignatureException") from None
        if key_id != self.access_key_id:
            raise Refused(400, "UnrecognizedClientException")
        if (region, service, term) != (self.region, "kms", "aws4_request"):
            raise Refused(400, "InvalidSignatureException")
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise Refused(400, "IncompleteSignatureException") from None
        if abs(signed_at.timestamp() - time.time()) > 300 or amz_date[:8] != date:
            raise Refused(400, "InvalidSignatureException", "Signature expired")
        headers = request.headers
        canonical = "\n".join([
            request.method, "/", "",
            "".join(f"{n}:{' '.join(','.join(headers.getall(n, [])).split())}\n"
                    for n in signed),
            ";".join(signed), hashlib.sha256(body).hexdigest()])
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date,
                             f"{date}/{region}/kms/aws4_request",
                             hashlib.sha256(canonical.encode()).hexdigest()])
        expected = hmac.new(self._key(date), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise Refused(400, "InvalidSignatureException")


def canonical_context(context: dict[str, str] | None) -> bytes:
    out = bytearray()
    for name, value in sorted((context or {}).items()):
        for part in (name.encode(), value.encode()):
            out += struct.pack(">I", len(part)) + part
    return bytes(out)


class MinimalKms:
    def __init__(self, key: object, key_id: str, region: str, auth: SigV4) -> None:
        self.key, self.key_id, self.auth = key, key_id, auth
        self.key_uuid = uuid.UUID(key_id).bytes
        self.arn = f"arn:aws:kms:{region}:{ACCOUNT}:key/{key_id}"

    def _seal(self, plaintext: bytes, context: dict[str, str] | None) -> bytes:
        nonce = os.urandom(12)
        header = _HEADER.pack(1, 0, self.key_uuid, 1, nonce)
        sealed = self.key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,  # type: ignore[attr-defined]
                                  mechanism_param=GCMParams(nonce, header
                                                            + canonical_context(context), 128))
        return header + bytes(sealed)

    def _open(self, blob: bytes, context: dict[str, str] | None) -> bytes:
        if len(blob) < _HEADER.size + 16:
            raise Refused(400, "InvalidCiphertextException")
        version, _kdf, key_bytes, _backing, nonce = _HEADER.unpack_from(blob)
        if version != 1 or key_bytes != self.key_uuid:
            raise Refused(400, "InvalidCiphertextException")
        try:
            return bytes(self.key.decrypt(  # type: ignore[attr-defined]
                blob[_HEADER.size:], mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, blob[:_HEADER.size]
                                          + canonical_context(context), 128)))
        except pkcs11.PKCS11Error:
            raise Refused(400, "InvalidCiphertextException") from None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            self.auth.verify(request, body)
            target = request.headers.get("X-Amz-Target", "").removeprefix("TrentService.")
            try:
                params = json.loads(body)
            except ValueError:
                raise Refused(400, "SerializationException") from None
            context = params.get("EncryptionContext")
            if target == "Decrypt":
                plaintext = self._open(base64.b64decode(params["CiphertextBlob"]), context)
                answer = {"KeyId": self.arn, "Plaintext": base64.b64encode(plaintext).decode(),
                          "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
            elif target == "Encrypt":
                blob = self._seal(base64.b64decode(params["Plaintext"]), context)
                answer = {"KeyId": self.arn, "CiphertextBlob": base64.b64encode(blob).decode(),
                          "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
            elif target == "GenerateDataKey":
                data_key = os.urandom(32 if params.get("KeySpec", "AES_256") == "AES_256" else 16)
                blob = self._seal(data_key, context)
                answer = {"KeyId": self.arn, "CiphertextBlob": base64.b64encode(blob).decode(),
                          "Plaintext": base64.b64encode(data_key).decode()}
            else:
                raise Refused(400, "UnknownOperationException")
        except Refused as refused:
            return web.Response(body=json.dumps({"__type": refused.kind,
                                                 "message": refused.message}).encode(),
                                status=refused.status, content_type=CONTENT_TYPE)
        except (KeyError, TypeError, ValueError):
            return web.Response(body=b'{"__type":"ValidationException"}', status=400,
                                content_type=CONTENT_TYPE)
        return web.Response(body=json.dumps(answer, separators=(",", ":")).encode(),
                            content_type=CONTENT_TYPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-label", required=True)
    parser.add_argument("--module", required=True, help="the PKCS#11 module (libsofthsm2.so)")
    parser.add_argument("--access-key-id", required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()
    lib = pkcs11.lib(args.module)
    session = lib.get_token(token_label=args.token_label).open(
        user_pin=os.environ["BENCH_PIN"], rw=True)
    key = session.generate_key(KeyType.AES, 256, store=False,
                               capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                               template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    key_id = str(uuid.uuid4())
    kms = MinimalKms(key, key_id, args.region,
                     SigV4(args.access_key_id, os.environ["BENCH_SECRET"], args.region))
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/", kms.handle)

    async def announce(_app: web.Application) -> None:
        print(json.dumps({"key_id": key_id, "arn": kms.arn}), flush=True)

    app.on_startup.append(announce)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    session.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
