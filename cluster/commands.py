"""Commands of the replicated log and their msgpack encoding.

A command is everything the state machine needs to apply a change: the
proposer decides timestamps, ids and wrapped key material and puts them here,
so that `apply` reads no clock and draws no random number. On the wire a
command is the msgpack map `{"op": name, "v": schema version, "args": {...}}`;
a node decodes entries written by older nodes through the version number.

Commands never hold plaintext key material or secrets: only material wrapped
under the domain key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

SCHEMA_VERSION = 1


class CommandDecodeError(ValueError):
    """A log entry that is not a command this node understands."""


_COMMANDS: dict[str, type[Command]] = {}


@dataclass(frozen=True)
class Command:
    op: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.op = cls.__name__
        _COMMANDS[cls.op] = cls


@dataclass(frozen=True)
class InitCluster(Command):
    """Records the domain key's check value; the first proposal wins."""

    domain_key_check: str


@dataclass(frozen=True)
class RegisterNode(Command):
    node_id: str
    az: str
    raft_address: str
    api_url: str
    admin_url: str


@dataclass(frozen=True)
class PutAccessKey(Command):
    access_key_id: str
    principal_arn: str
    account_id: str
    wrapped_secret: bytes
    at: float


@dataclass(frozen=True)
class CreateKey(Command):
    key_id: str
    region: str
    account_id: str
    description: str
    key_usage: str
    key_spec: str
    origin: str
    policy: str
    tags: tuple[tuple[str, str], ...]
    # The symmetric backing key, or the private/secret key of an asymmetric or HMAC key,
    # wrapped under the domain key.
    wrapped_backing_key: bytes
    at: float
    # DER SubjectPublicKeyInfo of an asymmetric key (not secret); None otherwise.
    public_key: bytes | None = None
    # A key in a custom key store: its backing key is wrapped under that store's key.
    custom_key_store_id: str | None = None


@dataclass(frozen=True)
class SetImportParameters(Command):
    """GetParametersForImport: an RSA wrapping key pair made in the HSM for one EXTERNAL key.

    Its private key is here only wrapped under the domain key; a later call replaces it.
    """

    key_id: str
    token_id: bytes
    wrapping_algorithm: str
    wrapping_key_spec: str
    wrapped_private: bytes
    public_key: bytes
    expires_at: float


@dataclass(frozen=True)
class ImportKeyMaterial(Command):
    """Imported material, unwrapped in the proposer's HSM and re-wrapped under the domain key.

    `material_check` is a key check value computed in the HSM (kmsd.hsm.imported_material):
    apply compares it with the key's first import, so different material is refused everywhere
    alike. `public_key` is the DER SubjectPublicKeyInfo the proposer's HSM derived from an
    imported asymmetric private key (None for symmetric and HMAC keys).
    """

    key_id: str
    token_id: bytes
    wrapped_backing_key: bytes
    material_check: str
    expiration_model: str
    valid_to: float | None
    at: float
    public_key: bytes | None = None


@dataclass(frozen=True)
class DeleteImportedKeyMaterial(Command):
    """DeleteImportedKeyMaterial, or (expired_only) the leader's expiry of imported material:
    apply re-checks ValidTo against `at`, so a late or repeated proposal changes nothing."""

    key_id: str
    at: float
    expired_only: bool = False


@dataclass(frozen=True)
class CreateCustomKeyStore(Command):
    """A CloudHSM-type key store: a PKCS#11 token (label = CloudHsmClusterId) on every node.

    `sealed_password` is the token PIN (KeyStorePassword) sealed under the domain key."""

    store_id: str
    region: str
    account_id: str
    name: str
    cluster_id: str
    trust_anchor: str
    sealed_password: bytes
    at: float
    max_stores: int


@dataclass(frozen=True)
class UpdateCustomKeyStore(Command):
    """Any of the new name, token (CloudHsmClusterId) and sealed PIN; None leaves it."""

    store_id: str
    new_name: str | None
    cluster_id: str | None
    sealed_password: bytes | None


@dataclass(frozen=True)
class SetCustomKeyStoreConnection(Command):
    """ConnectCustomKeyStore's outcome (CONNECTED, or FAILED with an error code) or
    DisconnectCustomKeyStore (DISCONNECTED). `key_check` is the store key's check value the
    proposer's token showed when connecting; the first one is kept."""

    store_id: str
    connection_state: str
    error_code: str | None = None
    key_check: str | None = None


@dataclass(frozen=True)
class DeleteCustomKeyStore(Command):
    store_id: str


@dataclass(frozen=True)
class SetKeyEnabled(Command):
    key_id: str
    enabled: bool
    at: float


@dataclass(frozen=True)
class CreateAlias(Command):
    region: str
    alias_name: str
    target_key_id: str
    at: float


@dataclass(frozen=True)
class UpdateAlias(Command):
    region: str
    alias_name: str
    target_key_id: str
    at: float


@dataclass(frozen=True)
class DeleteAlias(Command):
    region: str
    alias_name: str


@dataclass(frozen=True)
class UpdateKeyDescription(Command):
    key_id: str
    description: str


@dataclass(frozen=True)
class TagKey(Command):
    """Adds tags or replaces their values; refused past `max_tags` tags on the key."""

    key_id: str
    tags: tuple[tuple[str, str], ...]
    max_tags: int


@dataclass(frozen=True)
class UntagKey(Command):
    key_id: str
    tag_keys: tuple[str, ...]


@dataclass(frozen=True)
class ScheduleKeyDeletion(Command):
    key_id: str
    deletion_date: float
    pending_window_days: int


@dataclass(frozen=True)
class CancelKeyDeletion(Command):
    key_id: str


@dataclass(frozen=True)
class DeleteKey(Command):
    """Proposed by the leader once a key's deletion date has passed; removes its material."""

    key_id: str
    at: float


@dataclass(frozen=True)
class SetKeyRotation(Command):
    key_id: str
    enabled: bool
    period_days: int
    at: float


@dataclass(frozen=True)
class RotateKey(Command):
    """A new backing-key version. `expected_version` makes racing proposals idempotent."""

    key_id: str
    wrapped_backing_key: bytes
    rotation_type: str
    expected_version: int
    max_on_demand: int
    at: float


@dataclass(frozen=True)
class PutPrincipal(Command):
    """A user, role or account root (`kind`), named by its IAM ARN."""

    arn: str
    account_id: str
    kind: str
    name: str
    at: float


@dataclass(frozen=True)
class DeletePrincipal(Command):
    """Removes the principal, its identity policies and its access keys."""

    arn: str


@dataclass(frozen=True)
class DeleteAccessKey(Command):
    access_key_id: str


@dataclass(frozen=True)
class PutPrincipalPolicy(Command):
    arn: str
    policy_name: str
    document: str


@dataclass(frozen=True)
class DeletePrincipalPolicy(Command):
    arn: str
    policy_name: str


@dataclass(frozen=True)
class PutKeyPolicy(Command):
    key_id: str
    policy: str


@dataclass(frozen=True)
class CreateGrant(Command):
    grant_id: str
    grant_token: str
    key_id: str
    name: str
    grantee_principal: str
    retiring_principal: str
    operations: tuple[str, ...]
    # Constraints as sorted pairs; an empty tuple and None differ (None: no constraint).
    encryption_context_equals: tuple[tuple[str, str], ...] | None
    encryption_context_subset: tuple[tuple[str, str], ...] | None
    issuing_account: str
    max_grants_per_key: int
    max_grants_per_grantee: int
    at: float


@dataclass(frozen=True)
class RemoveGrant(Command):
    """RetireGrant and RevokeGrant: the grant stops authorising at this log position."""

    key_id: str
    grant_id: str


@dataclass(frozen=True)
class AppendAudit(Command):
    """A group-committed batch of audit records.

    Each entry is (canonical event bytes, serving node, decisions, usage):
    decisions are the (key id, key epoch) pairs the request was allowed on: a
    record whose key epoch moved before this entry applies is revoked. usage is
    () or (key id, operation, event time, event id, request id) of a successful
    cryptographic operation, for GetKeyLastUsage.
    """

    entries: tuple[tuple[bytes, str, tuple[tuple[str, int], ...], tuple[str, ...]], ...]


@dataclass(frozen=True)
class SetAuditSigningKey(Command):
    """The HSM key that signs audit digests (wrapped private, DER public); the first wins."""

    wrapped_private: bytes
    public_key: bytes


@dataclass(frozen=True)
class CreateJoinToken(Command):
    """A one-time token (only its SHA-256 is stored) that lets one node join."""

    token_hash: str
    expires_at: float


@dataclass(frozen=True)
class ConsumeJoinToken(Command):
    token_hash: str
    node_id: str
    at: float


@dataclass(frozen=True)
class DeregisterNode(Command):
    node_id: str


@dataclass(frozen=True)
class RestoreSnapshot(Command):
    """Load keys, aliases, grants, principals and access keys from a saved state snapshot
    into a cluster that has no keys yet (disaster recovery); key material stays wrapped."""

    snapshot: bytes


@dataclass(frozen=True)
class RequestDomainRotation(Command):
    """An operator asked for a domain-key rotation; the leader carries it out
    (kmsd.service.domain_rotation). Changes nothing while one is requested or running."""

    at: float


@dataclass(frozen=True)
class BeginDomainRotation(Command):
    """A new domain-key generation, made in the proposer's HSM (its check value here),
    pending until every member holds it. `generation` must be the next number."""

    generation: int
    check: str
    at: float


@dataclass(frozen=True)
class AbandonDomainGeneration(Command):
    """Give up a pending generation (the leader does not hold it: its maker left before
    cloning it there); the rotation stays requested and begins again with the next number."""

    generation: int
    at: float


@dataclass(frozen=True)
class ActivateDomainGeneration(Command):
    """Every member confirmed it holds the pending generation: new blobs are wrapped under it
    and the previous active generation starts retiring. Refused unless `confirmed_members`
    covers every member at this log position."""

    generation: int
    confirmed_members: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class RewrapDomainBlobs(Command):
    """A batch of blobs re-wrapped in the proposer's HSM under the active `generation`:
    (locator, old blob, new blob). Each item applies only if its blob is still `old`."""

    generation: int
    items: tuple[tuple[tuple[str, ...], bytes, bytes], ...]


@dataclass(frozen=True)
class RetireDomainGeneration(Command):
    """No blob refers to this retiring generation any more: every token may destroy it."""

    generation: int
    at: float


@dataclass(frozen=True)
class Barrier(Command):
    """Changes nothing; its commit proves this node has applied the log up to it."""


def encode(command: Command) -> bytes:
    # msgpack packs a tuple as the array a list would be, so nested tuples go out as they are:
    # converting them first cost a recursive walk over every AppendAudit entry.
    args = {f.name: getattr(command, f.name) for f in dataclasses.fields(command)}
    return msgpack.packb({"op": command.op, "v": SCHEMA_VERSION, "args": args}, use_bin_type=True)


def decode(data: bytes) -> Command:
    try:
        # Arrays come back as tuples, which is what every array-holding field is: the C
        # unpacker builds them, instead of a walk over every entry rebuilding lists.
        raw = msgpack.unpackb(data, raw=False, use_list=False)
        cls = _COMMANDS[raw["op"]]
        version = raw["v"]
        args = raw["args"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CommandDecodeError("not a kmsd command") from exc
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CommandDecodeError(f"{version!r} is not a command schema version")
    if version > SCHEMA_VERSION:
        raise CommandDecodeError(f"command schema version {version} is newer than this node")
    names = {f.name for f in dataclasses.fields(cls)}
    # Every replica must apply exactly what was proposed: an argument this node does not
    # know is refused, never dropped.
    if not isinstance(args, dict) or not args.keys() <= names:
        raise CommandDecodeError(f"malformed {cls.op} command")
    try:
        return cls(**args)
    except TypeError as exc:
        raise CommandDecodeError(f"malformed {cls.op} command") from exc
