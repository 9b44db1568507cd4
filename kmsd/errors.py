"""AWS KMS error types, each knowing its HTTP status.

Every error a caller may see is one of these classes, named exactly after the
AWS error type (the `__type` of the JSON 1.1 error body). Anything else that
escapes a handler is a bug and is turned into KMSInternalException. Messages
never carry plaintext, key material, MACs or secrets.
"""

from __future__ import annotations

from typing import ClassVar


class KmsError(Exception):
    """Base of every error that is answered to a caller."""

    error_type: ClassVar[str] = "KMSInternalException"
    http_status: ClassVar[int] = 400
    # Errors the SDKs retry; a node that cannot reach a quorum answers one of these.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def to_body(self) -> dict[str, str]:
        body = {"__type": self.error_type}
        if self.message:
            body["message"] = self.message
        return body


_REGISTRY: dict[str, type[KmsError]] = {}


def _define(name: str, status: int = 400, retryable: bool = False) -> type[KmsError]:
    cls = type(name, (KmsError,), {"error_type": name, "http_status": status,
                                   "retryable": retryable})
    _REGISTRY[name] = cls
    return cls


# Protocol and authentication errors (not in the KMS model, common to AWS JSON services).
SerializationException = _define("SerializationException")
ValidationException = _define("ValidationException")
UnknownOperationException = _define("UnknownOperationException")
MissingAuthenticationTokenException = _define("MissingAuthenticationTokenException", 403)
IncompleteSignatureException = _define("IncompleteSignatureException")
InvalidSignatureException = _define("InvalidSignatureException")
UnrecognizedClientException = _define("UnrecognizedClientException")
AccessDeniedException = _define("AccessDeniedException")
ThrottlingException = _define("ThrottlingException", 400, retryable=True)

# Errors of the KMS service model.
AlreadyExistsException = _define("AlreadyExistsException")
ConflictException = _define("ConflictException")
DependencyTimeoutException = _define("DependencyTimeoutException", 503, retryable=True)
DisabledException = _define("DisabledException")
DryRunOperationException = _define("DryRunOperationException")
IncorrectKeyException = _define("IncorrectKeyException")
IncorrectKeyMaterialException = _define("IncorrectKeyMaterialException")
ExpiredImportTokenException = _define("ExpiredImportTokenException")
InvalidImportTokenException = _define("InvalidImportTokenException")
InvalidAliasNameException = _define("InvalidAliasNameException")
InvalidArnException = _define("InvalidArnException")
InvalidCiphertextException = _define("InvalidCiphertextException")
InvalidGrantTokenException = _define("InvalidGrantTokenException")
InvalidKeyUsageException = _define("InvalidKeyUsageException")
InvalidMarkerException = _define("InvalidMarkerException")
KMSInternalException = _define("KMSInternalException", 500, retryable=True)
KMSInvalidStateException = _define("KMSInvalidStateException")
KMSInvalidMacException = _define("KMSInvalidMacException")
KMSInvalidSignatureException = _define("KMSInvalidSignatureException")
KeyUnavailableException = _define("KeyUnavailableException", 500)
LimitExceededException = _define("LimitExceededException")
MalformedPolicyDocumentException = _define("MalformedPolicyDocumentException")
NotFoundException = _define("NotFoundException")
TagException = _define("TagException")
UnsupportedOperationException = _define("UnsupportedOperationException")
CustomKeyStoreNotFoundException = _define("CustomKeyStoreNotFoundException")
CustomKeyStoreInvalidStateException = _define("CustomKeyStoreInvalidStateException")
CustomKeyStoreNameInUseException = _define("CustomKeyStoreNameInUseException")
CustomKeyStoreHasCMKsException = _define("CustomKeyStoreHasCMKsException")
CloudHsmClusterInUseException = _define("CloudHsmClusterInUseException")
CloudHsmClusterNotFoundException = _define("CloudHsmClusterNotFoundException")
CloudHsmClusterNotRelatedException = _define("CloudHsmClusterNotRelatedException")


def error_class(name: str) -> type[KmsError]:
    """The error class for an AWS error type name (KMSInternalException if unknown)."""
    return _REGISTRY.get(name, KMSInternalException)
