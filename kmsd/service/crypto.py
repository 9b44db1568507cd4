"""Symmetric cryptographic operations: Encrypt, Decrypt, GenerateDataKey*, GenerateRandom.

Encrypt, Decrypt and ReEncrypt also take RSA keys (RSAES_OAEP_*): those branches are
kmsd.service.rsa_encryption's.

Plaintext passes through here only on its way between the caller and the HSM;
it is never logged, stored or put into an error message. Every failure to
authenticate a ciphertext is one InvalidCiphertextException, whatever the cause.
"""

from __future__ import annotations

from typing import Any

from cluster.state import BackingKey, KeyRecord, key_arn
from kmsd import ciphertext_blob, encryption_context
from kmsd.errors import (
    DryRunOperationException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    NotFoundException,
    ValidationException,
)
from kmsd.hsm.partition import HsmAuthenticationFailed
from kmsd.service import custom_key_stores, rsa_encryption
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.key_specs import ENCRYPT_DECRYPT, require_usage, wrong_key_spec
from kmsd.service.rotation import key_material_id

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."
_DATA_KEY_BYTES = {"AES_256": 32, "AES_128": 16}


def _require_symmetric(record: KeyRecord, algorithm: str | None, operation: str) -> None:
    require_usage(record, ENCRYPT_DECRYPT, operation)
    if record.key_spec != SYMMETRIC_DEFAULT:
        raise wrong_key_spec(record.arn, record.key_spec, operation)
    _require_symmetric_algorithm(record, algorithm)


def _require_symmetric_algorithm(record: KeyRecord, algorithm: str | None) -> None:
    if algorithm not in (None, SYMMETRIC_DEFAULT):
        raise InvalidKeyUsageException(
            f"The encryption algorithm {algorithm} is not supported by {record.arn}.")


def _require_encryption_key(record: KeyRecord, algorithm: str | None,
                            context: dict[str, str] | None, operation: str) -> str:
    """Encrypt and ReEncrypt's destination: a symmetric or an RSA ENCRYPT_DECRYPT key.
    Returns the encryption algorithm the operation uses."""
    require_usage(record, ENCRYPT_DECRYPT, operation)
    if record.key_spec == SYMMETRIC_DEFAULT:
        _require_symmetric_algorithm(record, algorithm)
        return SYMMETRIC_DEFAULT
    return rsa_encryption.check_key(record, algorithm, context, operation)


def _seal(core: ServiceCore, record: KeyRecord, plaintext: bytes,
          context: dict[str, str] | None) -> bytes:
    backing = record.current_backing_key
    nonce = core.random(ciphertext_blob.NONCE_BYTES)
    header = ciphertext_blob.header_for(record.key_id, backing.version, nonce)
    aad = header + encryption_context.canonical(context)
    sealed = core.partition_for(record).encrypt_gcm(backing.wrapped, nonce, aad, plaintext)
    return header + sealed


def _dry_run(params: dict[str, Any]) -> None:
    """Every check has passed: a dry run stops here, before any key is used."""
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)


async def _usable_symmetric_key(core: ServiceCore, ctx: RequestContext, operation: str,
                                params: dict[str, Any]) -> KeyRecord:
    record = await core.authorized_key(ctx, operation, params)
    _require_symmetric(record, params.get("EncryptionAlgorithm"), operation)
    core.require_usable(record)
    return record


async def encrypt(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "Encrypt", params)
    context = params.get("EncryptionContext")
    algorithm = _require_encryption_key(record, params.get("EncryptionAlgorithm"), context,
                                        "Encrypt")
    core.require_usable(record)
    if algorithm != SYMMETRIC_DEFAULT:
        rsa_encryption.check_plaintext(record, algorithm, params["Plaintext"])
    _dry_run(params)
    if algorithm == SYMMETRIC_DEFAULT:
        blob = _seal(core, record, params["Plaintext"], context)
    else:
        blob = rsa_encryption.encrypt(record, algorithm, params["Plaintext"])
    return {"CiphertextBlob": blob, "KeyId": record.arn, "EncryptionAlgorithm": algorithm}


def _require_blob(params: dict[str, Any]) -> bytes:
    if "CiphertextBlob" not in params:
        # Optional in the model (for Recipient flows), required by every Decrypt kmsd serves.
        raise ValidationException(
            "1 validation error detected: Value null at 'ciphertextBlob' failed to satisfy "
            "constraint: Member must not be null")
    return params["CiphertextBlob"]


async def _unseal(core: ServiceCore, ctx: RequestContext, operation: str,
                  params: dict[str, Any], context: dict[str, str] | None, key_id: str | None,
                  algorithm: str | None, dry_run: bool = False
                  ) -> tuple[KeyRecord, BackingKey, bytes]:
    """Authenticate and decrypt a ciphertext blob; every authentication failure is one error."""
    try:
        blob = ciphertext_blob.parse(_require_blob(params))
    except ciphertext_blob.MalformedCiphertext:
        raise InvalidCiphertextException() from None
    record = await core.find_key_by_id(ctx, blob.key_id)
    if record is None:
        raise NotFoundException(
            f"Key '{key_arn(ctx.region, core.account_id, blob.key_id)}' does not exist")
    if key_id is not None:
        requested = await core.find_key(ctx, key_id)
        if requested.key_id != record.key_id:
            raise IncorrectKeyException(
                "The key ID in the request does not identify a CMK that can perform this "
                "operation.")
    await core.authorize(ctx, operation, record, params)
    _require_symmetric(record, algorithm, "ReEncrypt" if operation.startswith("ReEncrypt")
                       else operation)
    core.require_usable(record)
    backing = record.backing_key(blob.backing_version)
    if backing is None:
        raise InvalidCiphertextException()
    aad = blob.header + encryption_context.canonical(context)
    try:
        plaintext = core.partition_for(record).decrypt_gcm(backing.wrapped, blob.nonce, aad,
                                                           blob.ciphertext_and_tag)
    except HsmAuthenticationFailed:
        raise InvalidCiphertextException() from None
    if dry_run:
        raise DryRunOperationException(DRY_RUN_MESSAGE)
    return record, backing, plaintext


async def decrypt(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    algorithm = params.get("EncryptionAlgorithm")
    if rsa_encryption.is_rsa_algorithm(algorithm):
        record, plaintext = await rsa_encryption.decrypt(
            core, ctx, params, _require_blob(params), params.get("KeyId"), algorithm,
            params.get("EncryptionContext"), "Decrypt", "Decrypt")
        _dry_run(params)
        return {"KeyId": record.arn, "Plaintext": plaintext, "EncryptionAlgorithm": algorithm}
    record, backing, plaintext = await _unseal(
        core, ctx, "Decrypt", params, params.get("EncryptionContext"), params.get("KeyId"),
        params.get("EncryptionAlgorithm"), params.get("DryRun", False))
    return {"KeyId": record.arn, "Plaintext": plaintext, "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
            "KeyMaterialId": key_material_id(backing)}


async def re_encrypt(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    source_algorithm = params.get("SourceEncryptionAlgorithm")
    response: dict[str, Any] = {}
    if rsa_encryption.is_rsa_algorithm(source_algorithm):
        source, plaintext = await rsa_encryption.decrypt(
            core, ctx, params, _require_blob(params), params.get("SourceKeyId"),
            source_algorithm, params.get("SourceEncryptionContext"), "ReEncryptFrom",
            "ReEncrypt")
    else:
        source, source_backing, plaintext = await _unseal(
            core, ctx, "ReEncryptFrom", params, params.get("SourceEncryptionContext"),
            params.get("SourceKeyId"), source_algorithm)
        source_algorithm = SYMMETRIC_DEFAULT
        response["SourceKeyMaterialId"] = key_material_id(source_backing)
    destination = await core.authorized_key(ctx, "ReEncryptTo", params,
                                            params["DestinationKeyId"])
    context = params.get("DestinationEncryptionContext")
    algorithm = _require_encryption_key(
        destination, params.get("DestinationEncryptionAlgorithm"), context, "ReEncrypt")
    core.require_usable(destination)
    if algorithm != SYMMETRIC_DEFAULT:
        rsa_encryption.check_plaintext(destination, algorithm, plaintext)
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)
    if algorithm == SYMMETRIC_DEFAULT:
        blob = _seal(core, destination, plaintext, context)
        response["DestinationKeyMaterialId"] = key_material_id(destination.current_backing_key)
    else:
        blob = rsa_encryption.encrypt(destination, algorithm, plaintext)
    return {"CiphertextBlob": blob, "SourceKeyId": source.arn, "KeyId": destination.arn,
            "SourceEncryptionAlgorithm": source_algorithm,
            "DestinationEncryptionAlgorithm": algorithm, **response}


def _data_key_length(params: dict[str, Any]) -> int:
    key_spec, number_of_bytes = params.get("KeySpec"), params.get("NumberOfBytes")
    if (key_spec is None) == (number_of_bytes is None):
        raise ValidationException("Please specify either number of bytes or key spec.")
    return _DATA_KEY_BYTES[key_spec] if key_spec is not None else int(number_of_bytes)


async def generate_data_key(core: ServiceCore, ctx: RequestContext,
                            params: dict[str, Any], operation: str = "GenerateDataKey") -> dict:
    length = _data_key_length(params)
    record = await _usable_symmetric_key(core, ctx, operation, params)
    _dry_run(params)
    data_key = core.random(length)
    blob = _seal(core, record, data_key, params.get("EncryptionContext"))
    return {"CiphertextBlob": blob, "Plaintext": data_key, "KeyId": record.arn}


async def generate_data_key_without_plaintext(core: ServiceCore, ctx: RequestContext,
                                              params: dict[str, Any]) -> dict:
    response = await generate_data_key(core, ctx, params, "GenerateDataKeyWithoutPlaintext")
    del response["Plaintext"]
    return response


async def generate_random(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    await core.authorize(ctx, "GenerateRandom", None, params)
    number_of_bytes = params.get("NumberOfBytes")
    if number_of_bytes is None:
        raise ValidationException("NumberOfBytes is required.")
    store_id = params.get("CustomKeyStoreId")
    if store_id:
        # AWS: random bytes from the CloudHSM cluster of a connected key store.
        token = await custom_key_stores.token_of(core, ctx, store_id)
        return {"Plaintext": token.random(int(number_of_bytes))}
    return {"Plaintext": core.random(int(number_of_bytes))}
