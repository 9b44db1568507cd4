"""CloudTrail-shaped audit events for AWS KMS API calls.

Owns: `AuditEvent`, one record shaped like the CloudTrail event AWS KMS writes for an API call,
and `build_event`, which turns one request -- operation name, validated parameters, response or
error, caller, request metadata, resolved key ARNs -- into such an event; `encode_event`, which
gives the same event's canonical bytes (`chain.canonical_bytes` of its dict) directly, for the
request path.

Never does:
- read a clock, draw a random number or do I/O: the caller passes eventTime and eventID, so the
  proposer decides them and every replica sees the same event (what it remembers -- the last
  second formatted, callers' and keys' encoded parts -- only saves work: same input, same
  output);
- put plaintext, ciphertext, a data key, a MAC, a signature, a message, a public or private key
  blob, import material, a password or any other secret into an event. requestParameters and
  responseElements are built through an *allow-list* keyed by member name (`REQUEST_MEMBERS`,
  `RESPONSE_MEMBERS`): a member that is not listed -- including any blob member a future KMS
  model adds -- is dropped, and a listed member whose value is not of the kind listed (bytes
  where a string was expected, say) is dropped as well.

Shapes follow the AWS KMS Developer Guide, "Logging AWS KMS API calls with AWS CloudTrail"
(https://docs.aws.amazon.com/kms/latest/developerguide/logging-using-cloudtrail.html) and its
per-operation examples (same directory, `ct-<operation>.html`):
- logging-using-cloudtrail: "some fields are omitted from AWS KMS log entries, such as the
  Plaintext parameter of an Encrypt request, and the response to GetKeyPolicy or any
  cryptographic operation"; the key ARN of the affected key is added to responseElements of
  some key management operations.
- ct-decrypt: "always includes the encryptionAlgorithm in the requestParameters even if the
  encryption algorithm wasn't specified in the request. The ciphertext in the request and the
  plaintext in the response are omitted."; keyId is the key ARN; responseElements null.
- ct-encrypt: requestParameters {encryptionContext, keyId, encryptionAlgorithm}, responseElements
  null. ct-reencrypt: source/destination encryption algorithms and contexts, destinationKeyId;
  `resources` lists the source key, then the destination key.
- ct-generatedatakey, ct-generatedatakeyplaintext: requestParameters {keyId, keySpec,
  encryptionContext} -- no encryptionAlgorithm (GenerateDataKey has no such member), so none is
  invented here.
- ct-createkey: responseElements {"keyMetadata": {...}}, readOnly false. ct-describekey:
  responseElements null, readOnly true. ct-disablekey, ct-enablekey, ct-updatealias:
  responseElements {"keyId": <key ARN>} "even though this operation does not return the key ARN".
- Failed calls carry errorCode and errorMessage (FACTS.md §A.12).

Deliberate differences from CloudTrail:
- Timestamps inside requestParameters/responseElements (creationDate, deletionDate, validTo) are
  ISO-8601 UTC strings like eventTime, not CloudTrail's "Aug 10, 2022, 10:38:27 PM".
- responseElements.keyMetadata is a summary (identity, state, specs, usage, algorithms).
- userIdentity.principalId: kmsd has no IAM unique ids; see `user_identity`.
- Every value in an event is a string, a bool, an int, None, a list or a dict with string keys:
  never a float, never bytes, so the chain's canonical encoding (`chain.canonical_bytes`) needs
  no number formatting rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from kmsd.audit.chain import canonical_bytes, canonical_text

EVENT_VERSION = "1.08"
EVENT_SOURCE = "kms.amazonaws.com"
EVENT_TYPE = "AwsApiCall"
EVENT_CATEGORY = "Management"
RESOURCE_TYPE_KEY = "AWS::KMS::Key"
SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
EVENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Operations whose response CloudTrail never logs ("the response to ... any cryptographic
# operation" is omitted) and which it marks readOnly.
CRYPTO_OPERATIONS = frozenset({
    "Decapsulate", "Decrypt", "DeriveSharedSecret", "Encapsulate", "Encrypt", "GenerateDataKey",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext",
    "GenerateDataKeyWithoutPlaintext", "GenerateMac", "GenerateRandom", "ReEncrypt", "Sign",
    "Verify", "VerifyMac",
})
_READ_ONLY_PREFIXES = ("Describe", "Get", "List")

# Algorithm members CloudTrail records even when the caller left them out (ct-decrypt says so
# for Decrypt; ct-encrypt and ct-reencrypt show them). GenerateDataKey* have no such member and
# their documented entries show none.
DEFAULT_ALGORITHMS: Mapping[str, tuple[str, ...]] = {
    "Encrypt": ("EncryptionAlgorithm",),
    "Decrypt": ("EncryptionAlgorithm",),
    "ReEncrypt": ("SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm"),
}

# Integers beyond this lose precision in JavaScript-based log tooling; the chain refuses them.
MAX_SAFE_INT = 2**53 - 1


# The last second formatted and its text. Every request formats the current time, and a
# datetime round trip costs more than the rest of format_event_time ten times over; requests
# within one second share the text. One tuple, replaced whole: safe to share between threads.
_last_event_time: tuple[int | None, str] = (None, "")


def format_event_time(epoch_seconds: float) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds, truncated) for an epoch time."""
    global _last_event_time
    if isinstance(epoch_seconds, bool) or not math.isfinite(epoch_seconds):
        raise ValueError(f"event time must be a finite number of seconds: {epoch_seconds!r}")
    second = math.floor(epoch_seconds)
    if type(second) is not int:  # (an odd __floor__ only): not worth remembering
        return datetime.fromtimestamp(second, UTC).strftime(EVENT_TIME_FORMAT)
    last_second, text = _last_event_time
    if second != last_second:
        text = datetime.fromtimestamp(second, UTC).strftime(EVENT_TIME_FORMAT)
        _last_event_time = (second, text)
    return text


# -- allow-list renderers ------------------------------------------------------------------------
# A renderer turns one validated member value into its JSON-ready log form, or returns _DROP.

_Render = Callable[[Any], Any]
_DROP: Any = object()


def _scalar(value: Any) -> Any:
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int) and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return value
    return _DROP  # bytes, floats, structures: never where a scalar was allowed


def _timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).strftime(EVENT_TIME_FORMAT)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return format_event_time(value)
    return _DROP


def _string_list(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return _DROP


def _string_map(value: Any) -> Any:
    # Keys are data (encryption-context keys), not member names: kept verbatim.
    if type(value) is dict or isinstance(value, Mapping):  # (the ABC check alone is slow)
        return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return _DROP


def _structure(members: Mapping[str, _Render]) -> _Render:
    def render(value: Any) -> Any:
        if type(value) is not dict and not isinstance(value, Mapping):
            return _DROP
        return render_members(value, members)
    return render


def _structure_list(members: Mapping[str, _Render]) -> _Render:
    item = _structure(members)

    def render(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return _DROP
        return [r for r in (item(v) for v in value) if r is not _DROP]
    return render


def log_name(member: str) -> str:
    """The CloudTrail spelling of a KMS member name: lower camel case (`KeyId` -> `keyId`)."""
    if type(member) is str:  # (a subclass is spelled out, as it always was)
        known = _LOG_NAMES.get(member)
        if known is not None:
            return known
    return _spell(member)


def _spell(member: str) -> str:
    if member == "AWSAccountId":  # kept as-is in keyMetadata (ct-createkey)
        return member
    return member[:1].lower() + member[1:]


# The spelling of every allow-listed member, filled in below the lists: every request renders
# a few members, and spelling each one out costs more than rendering its value.
_LOG_NAMES: dict[str, str] = {}


def render_members(values: Mapping[str, Any], allowed: Mapping[str, _Render]) -> dict[str, Any]:
    """The allow-listed members of `values`, renamed to lower camel case and rendered."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        render = allowed.get(name)
        if render is None or value is None:
            continue
        rendered = render(value)
        if rendered is not _DROP:
            out[log_name(name)] = rendered
    return out


_TAG: Mapping[str, _Render] = {"TagKey": _scalar, "TagValue": _scalar}
_RECIPIENT: Mapping[str, _Render] = {"KeyEncryptionAlgorithm": _scalar}
_CONSTRAINTS: Mapping[str, _Render] = {"EncryptionContextSubset": _string_map,
                                       "EncryptionContextEquals": _string_map,
                                       "SourceArn": _scalar}

# Request members that may appear in requestParameters, by KMS member name (a name means the
# same thing in every operation that has it). Deliberately absent, and so never logged:
# Plaintext, CiphertextBlob, Message, Signature, Mac, PublicKey, ImportToken,
# EncryptedKeyMaterial, SharedSecretCiphertextBlob, Recipient.AttestationDocument,
# KeyStorePassword, XksProxyAuthenticationCredential (both its members are `sensitive` in the
# model), and anything new.
REQUEST_MEMBERS: Mapping[str, _Render] = {
    # which key, which alias
    "KeyId": _scalar, "SourceKeyId": _scalar, "DestinationKeyId": _scalar,
    "TargetKeyId": _scalar, "AliasName": _scalar,
    # key properties and lifecycle
    "Description": _scalar, "KeyUsage": _scalar, "KeySpec": _scalar,
    "CustomerMasterKeySpec": _scalar, "KeyPairSpec": _scalar, "Origin": _scalar,
    "MultiRegion": _scalar, "XksKeyId": _scalar, "Policy": _scalar, "PolicyName": _scalar,
    "BypassPolicyLockoutSafetyCheck": _scalar, "Tags": _structure_list(_TAG),
    "TagKeys": _string_list, "PendingWindowInDays": _scalar, "RotationPeriodInDays": _scalar,
    "ReplicaRegion": _scalar, "PrimaryRegion": _scalar,
    # cryptographic parameters (not the data)
    "EncryptionContext": _string_map, "SourceEncryptionContext": _string_map,
    "DestinationEncryptionContext": _string_map, "EncryptionAlgorithm": _scalar,
    "SourceEncryptionAlgorithm": _scalar, "DestinationEncryptionAlgorithm": _scalar,
    "NumberOfBytes": _scalar, "MacAlgorithm": _scalar, "SigningAlgorithm": _scalar,
    "MessageType": _scalar, "KeyAgreementAlgorithm": _scalar, "EncapsulationAlgorithm": _scalar,
    "Recipient": _structure(_RECIPIENT),
    "GrantTokens": _string_list, "DryRun": _scalar, "DryRunModifiers": _string_list,
    # grants (grant tokens are documented by AWS as nonsecret)
    "GrantId": _scalar, "GrantToken": _scalar, "Name": _scalar, "GranteePrincipal": _scalar,
    "RetiringPrincipal": _scalar, "GranteeServicePrincipal": _scalar,
    "RetiringServicePrincipal": _scalar, "Operations": _string_list,
    "Constraints": _structure(_CONSTRAINTS),
    # importing key material (the parameters, never the material or the token)
    "WrappingAlgorithm": _scalar, "WrappingKeySpec": _scalar, "ValidTo": _timestamp,
    "ExpirationModel": _scalar, "ImportType": _scalar, "KeyMaterialDescription": _scalar,
    "KeyMaterialId": _scalar,
    # custom key stores (never the password, never the XKS proxy credential)
    "CustomKeyStoreId": _scalar, "CustomKeyStoreName": _scalar,
    "NewCustomKeyStoreName": _scalar, "CustomKeyStoreType": _scalar,
    "CloudHsmClusterId": _scalar, "XksProxyUriEndpoint": _scalar, "XksProxyUriPath": _scalar,
    "XksProxyVpcEndpointServiceName": _scalar, "XksProxyVpcEndpointServiceOwner": _scalar,
    "XksProxyConnectivity": _scalar,
    # listing
    "Limit": _scalar, "Marker": _scalar, "ResourceOwners": _string_list,
    "IncludeKeyMaterial": _scalar,
}

KEY_METADATA_SUMMARY: Mapping[str, _Render] = {
    "AWSAccountId": _scalar, "KeyId": _scalar, "Arn": _scalar, "CreationDate": _timestamp,
    "Enabled": _scalar, "Description": _scalar, "KeyUsage": _scalar, "KeyState": _scalar,
    "DeletionDate": _timestamp, "PendingDeletionWindowInDays": _scalar, "Origin": _scalar,
    "KeyManager": _scalar, "CustomerMasterKeySpec": _scalar, "KeySpec": _scalar,
    "EncryptionAlgorithms": _string_list, "SigningAlgorithms": _string_list,
    "MacAlgorithms": _string_list, "MultiRegion": _scalar,
}

# Response members that may appear in responseElements of a successful, mutating, non-crypto
# call. Never GrantToken, Policy, ReplicaPolicy, PublicKey, ImportToken or any blob.
RESPONSE_MEMBERS: Mapping[str, _Render] = {
    "KeyId": _scalar, "GrantId": _scalar, "KeyState": _scalar, "DeletionDate": _timestamp,
    "PendingWindowInDays": _scalar, "KeyMaterialId": _scalar, "CustomKeyStoreId": _scalar,
    "KeyMetadata": _structure(KEY_METADATA_SUMMARY),
    "ReplicaKeyMetadata": _structure(KEY_METADATA_SUMMARY),
}

_LOG_NAMES.update({name: _spell(name) for table in (REQUEST_MEMBERS, RESPONSE_MEMBERS,
                                                    KEY_METADATA_SUMMARY, _TAG, _RECIPIENT,
                                                    _CONSTRAINTS) for name in table})
_LOG_NAMES.update({name: _spell(name) for names in DEFAULT_ALGORITHMS.values() for name in names})


# -- the event -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserIdentity:
    identity_type: str  # "IAMUser" | "Root" | "AssumedRole" | "Unknown"
    principal_id: str
    arn: str
    account_id: str
    access_key_id: str
    user_name: str | None = None  # IAM users only, as CloudTrail

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.identity_type, "principalId": self.principal_id,
                               "arn": self.arn, "accountId": self.account_id,
                               "accessKeyId": self.access_key_id}
        if self.user_name is not None:
            out["userName"] = self.user_name
        return out


def user_identity(principal_arn: str, account_id: str, access_key_id: str,
                  principal_id: str | None = None) -> UserIdentity:
    """The CloudTrail userIdentity for a caller, its type derived from the principal ARN.

    `arn:<partition>:iam::<acct>:root` is Root, `...:iam::<acct>:user/<path>/<name>` IAMUser
    (userName = name), `...:sts::<acct>:assumed-role/<role>/<session>` AssumedRole, anything else
    Unknown. kmsd has no IAM unique ids, so unless one is given principalId is the account id
    for Root (as CloudTrail writes it) and the principal ARN otherwise: stable and unique.
    """
    kind, user_name = "Unknown", None
    parts = principal_arn.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn":
        service, resource = parts[2], parts[5]
        if service == "iam" and resource == "root":
            kind = "Root"
        elif service == "iam" and resource.startswith("user/") and len(resource) > 5:
            kind, user_name = "IAMUser", resource.rsplit("/", 1)[1]
        elif service == "sts" and resource.startswith("assumed-role/"):
            kind = "AssumedRole"
    if principal_id is None:
        principal_id = account_id if kind == "Root" else principal_arn
    return UserIdentity(kind, principal_id, principal_arn, account_id, access_key_id, user_name)


@dataclass(frozen=True)
class Resource:
    account_id: str
    arn: str
    resource_type: str = RESOURCE_TYPE_KEY

    def to_dict(self) -> dict[str, Any]:
        return {"accountId": self.account_id, "type": self.resource_type, "ARN": self.arn}


@dataclass(frozen=True)
class AuditEvent:
    """One audit record, shaped like the CloudTrail event AWS KMS writes for an API call.

    `request_parameters` and `response_elements` are JSON-ready dicts (strings, bools, ints,
    None, lists, dicts) already filtered through the allow-lists; treat them as read-only.
    """

    user_identity: UserIdentity
    event_time: str
    event_name: str
    aws_region: str
    source_ip_address: str
    user_agent: str
    request_parameters: dict[str, Any] | None
    response_elements: dict[str, Any] | None
    request_id: str
    event_id: str
    read_only: bool
    recipient_account_id: str
    error_code: str | None = None
    error_message: str | None = None
    resources: tuple[Resource, ...] = ()
    event_version: str = EVENT_VERSION
    event_source: str = EVENT_SOURCE
    event_type: str = EVENT_TYPE
    management_event: bool = True
    event_category: str = EVENT_CATEGORY

    def to_dict(self) -> dict[str, Any]:
        """The event as CloudTrail JSON (errorCode/errorMessage only on failure, resources only
        when a key is involved, as CloudTrail omits them)."""
        out: dict[str, Any] = {
            "eventVersion": self.event_version,
            "userIdentity": self.user_identity.to_dict(),
            "eventTime": self.event_time,
            "eventSource": self.event_source,
            "eventName": self.event_name,
            "awsRegion": self.aws_region,
            "sourceIPAddress": self.source_ip_address,
            "userAgent": self.user_agent,
        }
        if self.error_code is not None:
            out["errorCode"] = self.error_code
            out["errorMessage"] = self.error_message or ""
        out["requestParameters"] = self.request_parameters
        out["responseElements"] = self.response_elements
        out["requestID"] = self.request_id
        out["eventID"] = self.event_id
        out["readOnly"] = self.read_only
        if self.resources:
            out["resources"] = [r.to_dict() for r in self.resources]
        out["eventType"] = self.event_type
        out["managementEvent"] = self.management_event
        out["recipientAccountId"] = self.recipient_account_id
        out["eventCategory"] = self.event_category
        return out


def is_read_only(operation: str) -> bool:
    return operation in CRYPTO_OPERATIONS or operation.startswith(_READ_ONLY_PREFIXES)


def _account_of(arn: str, default: str) -> str:
    parts = arn.split(":", 5)
    return parts[4] if len(parts) == 6 and parts[0] == "arn" and parts[4] else default


def _primary_key_arn(key_arns: Sequence[str]) -> str | None:
    for arn in key_arns:
        if ":key/" in arn:
            return arn
    return None


def request_parameters(operation: str, params: Mapping[str, Any],
                       key_arns: Sequence[str] = ()) -> dict[str, Any] | None:
    """requestParameters for a call: allow-listed members, defaults CloudTrail fills in, and for
    Decrypt the resolved key ARN as keyId (ct-decrypt)."""
    out = render_members(params, REQUEST_MEMBERS)
    for member in DEFAULT_ALGORITHMS.get(operation, ()):
        out.setdefault(log_name(member), SYMMETRIC_DEFAULT)
    key_arn = _primary_key_arn(key_arns)
    if operation == "Decrypt" and key_arn is not None:
        out["keyId"] = key_arn
    return out or None


def response_elements(operation: str, response: Mapping[str, Any] | None,
                      key_arns: Sequence[str] = ()) -> dict[str, Any] | None:
    """responseElements for a successful call.

    None for cryptographic and read-only calls (logging-using-cloudtrail, ct-describekey);
    otherwise the allow-listed response members, plus keyId = the affected key's ARN where the
    response carries no key identity (ct-disablekey: "include the key ARN ... even though this
    operation does not return the key ARN").
    """
    if is_read_only(operation):
        return None
    out = render_members(response or {}, RESPONSE_MEMBERS)
    key_arn = _primary_key_arn(key_arns)
    if key_arn is not None and "keyId" not in out and not out.keys() & {"keyMetadata",
                                                                        "replicaKeyMetadata"}:
        out["keyId"] = key_arn
    return out or None


def build_event(
    *,
    operation: str,
    params: Mapping[str, Any],
    response: Mapping[str, Any] | None,
    error_code: str | None,
    error_message: str | None,
    principal_arn: str,
    account_id: str,
    access_key_id: str,
    region: str,
    source_ip: str,
    user_agent: str,
    request_id: str,
    event_id: str,
    event_time: float,
    key_arns: Sequence[str] = (),
    principal_id: str | None = None,
    recipient_account_id: str | None = None,
) -> AuditEvent:
    """The audit event for one request, allowed or denied.

    `params` are the validated request parameters (KMS member names, blobs as bytes); `response`
    the operation's response dict, or None; `error_code`/`error_message` the AWS error type and
    message of a failed call (then responseElements is null). `key_arns` are the ARNs of the
    keys (and aliases) the call resolved to, in CloudTrail's order (ReEncrypt: source, then
    destination); they become `resources`. `event_time` (epoch seconds) and `event_id` are
    chosen by the caller: this function reads no clock and draws no random number.
    """
    failed = error_code is not None
    key_arn = _primary_key_arn(key_arns)
    recipient = recipient_account_id or (_account_of(key_arn, account_id) if key_arn
                                         else account_id)
    return AuditEvent(
        user_identity=user_identity(principal_arn, account_id, access_key_id, principal_id),
        event_time=format_event_time(event_time),
        event_name=operation,
        aws_region=region,
        source_ip_address=source_ip,
        user_agent=user_agent,
        request_parameters=request_parameters(operation, params, key_arns),
        response_elements=None if failed else response_elements(operation, response, key_arns),
        request_id=request_id,
        event_id=event_id,
        read_only=is_read_only(operation),
        recipient_account_id=recipient,
        error_code=error_code,
        error_message=(error_message or "") if failed else None,
        resources=tuple(Resource(_account_of(arn, account_id), arn) for arn in key_arns),
    )


# -- the event as the chain stores it ------------------------------------------------------------

def encode_event(
    *,
    operation: str,
    params: Mapping[str, Any],
    response: Mapping[str, Any] | None,
    error_code: str | None,
    error_message: str | None,
    principal_arn: str,
    account_id: str,
    access_key_id: str,
    region: str,
    source_ip: str,
    user_agent: str,
    request_id: str,
    event_id: str,
    event_time: float,
    key_arns: Sequence[str] = (),
    principal_id: str | None = None,
    recipient_account_id: str | None = None,
) -> tuple[str, bytes]:
    """`(eventTime, canonical_bytes(build_event(...).to_dict()))` for the same arguments.

    The request path needs only these two, and building the frozen event, its dict, then
    checking and encoding the dict was most of the CPU an audit record cost. Here the member
    names are fixed text, the parts that repeat request after request (the caller's
    userIdentity, the keys' resources) are encoded once and reused, and only the values are
    escaped. requestParameters and responseElements come from `request_parameters` and
    `response_elements`, the allow-lists, exactly as in build_event.

    Anything out of the ordinary -- a value that is not a str where one belongs, an argument
    the shortcut does not expect -- falls back to the plain path, which gives the bytes or
    raises the error the plain path always did.
    """
    if type(key_arns) is list or type(key_arns) is tuple:  # read more than once below
        try:
            return _encode_event(operation, params, response, error_code, error_message,
                                 principal_arn, account_id, access_key_id, region, source_ip,
                                 user_agent, request_id, event_id, event_time, key_arns,
                                 principal_id, recipient_account_id)
        except Exception:  # the plain path below raises it again (or, if unusual, succeeds)
            pass
    event = build_event(
        operation=operation, params=params, response=response, error_code=error_code,
        error_message=error_message, principal_arn=principal_arn, account_id=account_id,
        access_key_id=access_key_id, region=region, source_ip=source_ip, user_agent=user_agent,
        request_id=request_id, event_id=event_id, event_time=event_time, key_arns=key_arns,
        principal_id=principal_id, recipient_account_id=recipient_account_id)
    return event.event_time, canonical_bytes(event.to_dict())


_STR_ONLY = frozenset({str})
_CACHE_LIMIT = 1024  # callers and key sets remembered; past that, start over
_identity_texts: dict[tuple[str, str, str, str | None], str] = {}
_resources_texts: dict[tuple[str, ...], str] = {}


def _identity_text(principal_arn: str, account_id: str, access_key_id: str,
                   principal_id: str | None) -> str:
    """canonical_text(user_identity(...).to_dict()), remembered per caller."""
    if (type(principal_arn) is not str or type(account_id) is not str
            or type(access_key_id) is not str
            or (principal_id is not None and type(principal_id) is not str)):
        # Only exact strs as the cache key: equal keys must mean equal encodings (1 == 1.0).
        return canonical_text(user_identity(principal_arn, account_id, access_key_id,
                                            principal_id).to_dict())
    key = (principal_arn, account_id, access_key_id, principal_id)
    text = _identity_texts.get(key)
    if text is None:
        text = canonical_text(user_identity(principal_arn, account_id, access_key_id,
                                            principal_id).to_dict())
        if len(_identity_texts) >= _CACHE_LIMIT:
            _identity_texts.clear()
        _identity_texts[key] = text
    return text


def _resources_text(account_id: str, key_arns: Sequence[str]) -> str:
    """The encoded `resources` list AuditEvent.to_dict() gives for these keys, remembered."""
    key = (account_id, *key_arns)
    cacheable = _STR_ONLY.issuperset(map(type, key))
    text = _resources_texts.get(key) if cacheable else None
    if text is None:
        text = canonical_text([Resource(_account_of(arn, account_id), arn).to_dict()
                               for arn in key_arns])
        if cacheable:
            if len(_resources_texts) >= _CACHE_LIMIT:
                _resources_texts.clear()
            _resources_texts[key] = text
    return text


# The members that never vary (AuditEvent's defaults, which build_event keeps), pre-encoded.
_EVENT_CATEGORY = encode_basestring_ascii(EVENT_CATEGORY)
_EVENT_SOURCE = encode_basestring_ascii(EVENT_SOURCE)
_EVENT_TYPE = encode_basestring_ascii(EVENT_TYPE)
_EVENT_VERSION = encode_basestring_ascii(EVENT_VERSION)


def _encode_event(operation: str, params: Mapping[str, Any],
                  response: Mapping[str, Any] | None, error_code: str | None,
                  error_message: str | None, principal_arn: str, account_id: str,
                  access_key_id: str, region: str, source_ip: str, user_agent: str,
                  request_id: str, event_id: str, event_time: float,
                  key_arns: list[str] | tuple[str, ...], principal_id: str | None,
                  recipient_account_id: str | None) -> tuple[str, bytes]:
    # build_event's steps, in its order; then AuditEvent.to_dict's members, in sorted order
    # (the canonical encoding sorts them: errorCode < errorMessage < eventCategory < ...).
    failed = error_code is not None
    recipient = recipient_account_id
    if not recipient:  # (the request path always names it: no need to look for the key)
        key_arn = _primary_key_arn(key_arns)
        recipient = _account_of(key_arn, account_id) if key_arn else account_id
    identity = _identity_text(principal_arn, account_id, access_key_id, principal_id)
    time_text = format_event_time(event_time)
    parameters = request_parameters(operation, params, key_arns)
    elements = None if failed else response_elements(operation, response, key_arns)
    read_only = is_read_only(operation)
    if read_only is not True and read_only is not False:
        raise TypeError("readOnly is not a bool")  # (a str subclass's startswith): plain path
    escape = encode_basestring_ascii  # raises TypeError on a non-str: the plain path decides
    errors = (f',"errorCode":{escape(error_code)},"errorMessage":{escape(error_message or "")}'
              if failed else "")
    resources = f',"resources":{_resources_text(account_id, key_arns)}' if key_arns else ""
    text = (
        f'{{"awsRegion":{escape(region)}{errors}'
        f',"eventCategory":{_EVENT_CATEGORY}'
        f',"eventID":{escape(event_id)}'
        f',"eventName":{escape(operation)}'
        f',"eventSource":{_EVENT_SOURCE}'
        f',"eventTime":{escape(time_text)}'
        f',"eventType":{_EVENT_TYPE}'
        f',"eventVersion":{_EVENT_VERSION}'
        f',"managementEvent":true'
        f',"readOnly":{"true" if read_only else "false"}'
        f',"recipientAccountId":{escape(recipient)}'
        f',"requestID":{escape(request_id)}'
        f',"requestParameters":{"null" if parameters is None else canonical_text(parameters)}'
        f'{resources}'
        f',"responseElements":{"null" if elements is None else canonical_text(elements)}'
        f',"sourceIPAddress":{escape(source_ip)}'
        f',"userAgent":{escape(user_agent)}'
        f',"userIdentity":{identity}}}')
    return time_text, text.encode("ascii")
