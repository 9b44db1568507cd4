"""Imported key material (Origin EXTERNAL): GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial, and the leader's expiry of material imported with ValidTo.

GetParametersForImport makes an RSA wrapping key pair in the HSM (in the helper process:
RSA key generation takes seconds); its private key enters the Raft log only wrapped under
the domain key, with an import-token id and an expiry 24 hours after the proposer's clock.
The import token is opaque to callers: `kit1 || token id || key id || SHA-256(public key)`,
bound to one key and one wrapping key. ImportKeyMaterial unwraps the material in the HSM
(kmsd.hsm.key_import; which path per wrapping algorithm is decided by the token's probe),
re-wraps it under the domain key and commits it with a key check value computed in the HSM
(and, for an asymmetric key, the public key the HSM derived from the private key); the state
machine refuses material whose check value differs from the first import's.

Keys that take imported material: SYMMETRIC_DEFAULT, HMAC_*, RSA_* and the ECC key specs
kmsd.hsm.imported_material lists (AWS: "You can import key material for a symmetric
encryption KMS key, HMAC KMS key, asymmetric encryption KMS key, or asymmetric signing KMS
key"). Which wrapping algorithm fits which material is kmsd.hsm.key_import.wrapping_refusal.
After DeleteImportedKeyMaterial or expiry every node drops its HSM handles for the removed
material when it applies the change (kmsd.node), not only the node that served the request.
Never logs or puts into an error the material, the import token or the wrapped blobs.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import uuid
from typing import Any

from cluster import commands
from cluster.state import ORIGIN_EXTERNAL, SECONDS_PER_DAY, ImportParameters, KeyRecord
from kmsd.errors import (
    ExpiredImportTokenException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsd.hsm import key_import as hsm_import
from kmsd.hsm.capabilities import UNSUPPORTED
from kmsd.hsm.imported_material import IMPORTABLE_KEY_SPECS
from kmsd.service.asymmetric import generate_key
from kmsd.service.asymmetric_hsm import hsm_errors, router_of
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.key_specs import SYMMETRIC_DEFAULT
from kmsd.service.rotation import key_material_id

IMPORT_TOKEN_VALID_SECONDS = SECONDS_PER_DAY
MAX_VALID_TO_DAYS = 365
KEY_MATERIAL_EXPIRES = "KEY_MATERIAL_EXPIRES"
KEY_MATERIAL_DOES_NOT_EXPIRE = "KEY_MATERIAL_DOES_NOT_EXPIRE"
_TOKEN_MAGIC = b"kit1"
_TOKEN_ID_BYTES = 16
_TOKEN_BYTES = len(_TOKEN_MAGIC) + _TOKEN_ID_BYTES + 16 + 32


# -- the import token (pure) -------------------------------------------------------------

def encode_token(token_id: bytes, key_id: str, public_key: bytes) -> bytes:
    return (_TOKEN_MAGIC + token_id + uuid.UUID(key_id).bytes
            + hashlib.sha256(public_key).digest())


def check_token(token: bytes, record: KeyRecord, parameters: ImportParameters | None,
                now: float) -> ImportParameters:
    """The parameters an import token names, or InvalidImportTokenException /
    ExpiredImportTokenException as AWS answers them."""
    if (parameters is None or len(token) != _TOKEN_BYTES
            or not hmac.compare_digest(token, encode_token(parameters.token_id, record.key_id,
                                                           parameters.public_key))):
        raise InvalidImportTokenException("The import token that you specified is invalid.")
    if parameters.expires_at < now:
        raise ExpiredImportTokenException("The import token that you specified has expired.")
    return parameters


def valid_to_of(params: dict[str, Any], now: float) -> tuple[str, float | None]:
    """(ExpirationModel, ValidTo as epoch seconds) of an ImportKeyMaterial request."""
    valid_to = params.get("ValidTo")
    model = params.get("ExpirationModel") or (
        KEY_MATERIAL_EXPIRES if valid_to is not None else KEY_MATERIAL_DOES_NOT_EXPIRE)
    if model == KEY_MATERIAL_DOES_NOT_EXPIRE:
        if valid_to is not None:
            raise ValidationException("ValidTo must be omitted when ExpirationModel is "
                                      "KEY_MATERIAL_DOES_NOT_EXPIRE.")
        return model, None
    if valid_to is None:
        raise ValidationException("ValidTo is required when ExpirationModel is "
                                  "KEY_MATERIAL_EXPIRES.")
    seconds = (valid_to.timestamp() if isinstance(valid_to, datetime.datetime)
               else float(valid_to))
    if seconds <= now:
        raise ValidationException("ValidTo must be a time in the future.")
    if seconds > now + MAX_VALID_TO_DAYS * SECONDS_PER_DAY:
        raise ValidationException(f"ValidTo must be at most {MAX_VALID_TO_DAYS} days from now.")
    return model, seconds


# -- operations ----------------------------------------------------------------------------

def _require_importable(record: KeyRecord) -> None:
    if record.origin != ORIGIN_EXTERNAL:
        raise UnsupportedOperationException(
            f"{record.arn} origin is {record.origin} which is not valid for this operation.")
    if record.key_state == "PendingDeletion":
        raise KMSInvalidStateException(f"{record.arn} is pending deletion.")
    if record.key_spec not in IMPORTABLE_KEY_SPECS:
        raise UnsupportedOperationException(
            f"kmsd does not import key material for {record.key_spec} keys.")


def _path(core: ServiceCore, algorithm: str) -> str:
    # Operators may allow host-side OAEP decoding on hardware tokens that lack
    # RSA-OAEP-SHA256 in-token (`[hsm] allow_host_oaep_decoding`); software tokens always may.
    path, detail = hsm_import.import_path(router_of(core).capabilities, algorithm,
                                          core.allow_host_oaep_decoding)
    if algorithm in hsm_import.REFUSED_WRAPPING_ALGORITHMS:
        raise UnsupportedOperationException(f"WrappingAlgorithm {algorithm}: {detail}.")
    if path == UNSUPPORTED:
        raise UnsupportedOperationException(
            f"WrappingAlgorithm {algorithm} is not supported by this kmsd node: {detail}.")
    return path


async def get_parameters_for_import(core: ServiceCore, ctx: RequestContext,
                                    params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "GetParametersForImport", params, allow_alias=False)
    _require_importable(record)
    algorithm = params["WrappingAlgorithm"]
    spec = params["WrappingKeySpec"]
    if spec not in hsm_import.WRAPPING_KEY_SPECS:
        raise UnsupportedOperationException(f"WrappingKeySpec {spec} is not supported by kmsd.")
    _path(core, algorithm)
    refusal = hsm_import.wrapping_refusal(record.key_spec, algorithm, spec)
    if refusal is not None:
        raise UnsupportedOperationException(f"{refusal}.")
    generated = await generate_key(core, spec)  # in the HSM helper process
    assert generated.public_key_der is not None
    token_id = core.random(_TOKEN_ID_BYTES)
    expires_at = core.clock.now() + IMPORT_TOKEN_VALID_SECONDS
    parameters: ImportParameters = await core.commit(commands.SetImportParameters(
        key_id=record.key_id, token_id=token_id, wrapping_algorithm=algorithm,
        wrapping_key_spec=spec, wrapped_private=generated.wrapped_private,
        public_key=generated.public_key_der, expires_at=expires_at))
    return {"KeyId": record.arn,
            "ImportToken": encode_token(token_id, record.key_id, parameters.public_key),
            "PublicKey": parameters.public_key, "ParametersValidTo": expires_at}


async def import_key_material(core: ServiceCore, ctx: RequestContext,
                              params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "ImportKeyMaterial", params, allow_alias=False)
    _require_importable(record)
    if record.key_spec != SYMMETRIC_DEFAULT:
        for member in ("ImportType", "KeyMaterialId", "KeyMaterialDescription"):
            if params.get(member) is not None:
                # AWS: "This parameter is optional and only usable with symmetric
                # encryption keys."
                raise ValidationException(f"{member} is valid only for symmetric encryption "
                                          f"keys; {record.arn} is a {record.key_spec} key.")
    if params.get("ImportType") == "NEW_KEY_MATERIAL":
        raise UnsupportedOperationException(
            "kmsd does not rotate imported key material (ImportType NEW_KEY_MATERIAL).")
    now = core.clock.now()
    parameters = core.state.import_parameters.get(record.key_id)
    if parameters is None:
        await core.catch_up()
        parameters = core.state.import_parameters.get(record.key_id)
    parameters = check_token(params["ImportToken"], record, parameters, now)
    model, valid_to = valid_to_of(params, now)
    path = _path(core, parameters.wrapping_algorithm)
    router = router_of(core)
    # Material of the wrong kind answers IncorrectKeyMaterialException (hsm_errors).
    with hsm_errors():
        if router.worker is not None:
            imported = await router.worker.import_material(
                path, parameters.wrapping_algorithm, parameters.wrapped_private,
                parameters.wrapping_key_spec, params["EncryptedKeyMaterial"], record.key_spec)
        else:
            imported = hsm_import.import_material(
                core.hsm, path, parameters.wrapping_algorithm, parameters.wrapped_private,
                parameters.wrapping_key_spec, params["EncryptedKeyMaterial"], record.key_spec)
    updated: KeyRecord = await core.commit(commands.ImportKeyMaterial(
        key_id=record.key_id, token_id=parameters.token_id, wrapped_backing_key=imported.wrapped,
        material_check=imported.check_value, expiration_model=model, valid_to=valid_to, at=now,
        public_key=imported.public_key))
    if updated.key_spec != SYMMETRIC_DEFAULT:
        return {"KeyId": updated.arn}
    return {"KeyId": updated.arn,
            "KeyMaterialId": key_material_id(updated.current_backing_key)}


async def delete_imported_key_material(core: ServiceCore, ctx: RequestContext,
                                       params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "DeleteImportedKeyMaterial", params,
                                       allow_alias=False)
    _require_importable(record)
    await core.commit(commands.DeleteImportedKeyMaterial(record.key_id, core.clock.now()))
    return {"KeyId": record.arn}


async def expire_due(core: ServiceCore, record: KeyRecord, now: float) -> bool:
    """The leader's scheduler: delete imported material whose ValidTo has passed."""
    if (record.origin != ORIGIN_EXTERNAL or not record.backing_keys
            or record.valid_to is None or record.valid_to > now):
        return False
    result = await core.commit(commands.DeleteImportedKeyMaterial(record.key_id, now,
                                                                  expired_only=True))
    return result is not None
