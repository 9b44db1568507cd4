"""The replicated state of a kmsd cluster and its pure, deterministic apply.

`KmsState.apply(command)` reads no clock, draws no random number and does no
I/O: every replica that applies the same commands in the same order holds the
same state. It is driven by pysyncobj in production and directly by tests.

The state holds key metadata, aliases, access keys and cluster configuration.
Key material appears only wrapped under the domain key (a custom key store's
keys: under that store's key, in its token); access-key secrets and key store
passwords only sealed under the domain key. Which domain-key generation wraps what, and the
commands of a domain-key rotation, are in cluster/domain_generations.py.

Threading: `apply` runs in a pysyncobj tick on the node's event loop
(cluster/loop_tick.py), and executor threads may read meanwhile. Every change
replaces a whole frozen record (`dict[k] = new`) or removes one, which is
atomic under the GIL; readers take single lookups or `list(...)` copies and
never iterate a live dict.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from cluster import commands as c
from cluster import domain_generations as dg
from kmsd.audit.chain import AuditChain, AuditEntry, CanonicalEncodingError, ChainedRecord

KEY_STATE_ENABLED = "Enabled"
KEY_STATE_DISABLED = "Disabled"
KEY_STATE_PENDING_DELETION = "PendingDeletion"
# An EXTERNAL key without key material (new, deleted or expired): no backing key at all.
KEY_STATE_PENDING_IMPORT = "PendingImport"
ORIGIN_EXTERNAL = "EXTERNAL"


ROTATION_AUTOMATIC = "AUTOMATIC"
ROTATION_ON_DEMAND = "ON_DEMAND"
SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class BackingKey:
    version: int
    wrapped: bytes  # the backing key wrapped under the domain key (an "exported key token")
    created_at: float
    # None for the key's first material, else AUTOMATIC or ON_DEMAND.
    rotation_type: str | None = None
    # KeyMaterialId, fixed when a domain-key rotation first re-wraps the material (until then
    # the SHA-256 of `wrapped`); see key_material_id.
    material_id: str | None = None


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    region: str
    account_id: str
    description: str
    key_usage: str
    key_spec: str
    origin: str
    policy: str
    tags: tuple[tuple[str, str], ...]
    created_at: float
    key_state: str
    backing_keys: tuple[BackingKey, ...]
    # Bumped by every change that can alter an authorisation decision.
    epoch: int
    deletion_date: float | None = None
    pending_window_days: int | None = None
    rotation_enabled: bool = False
    rotation_period_days: int | None = None
    next_rotation_at: float | None = None
    # DER SubjectPublicKeyInfo of an asymmetric key (its private key is backing_keys[0]).
    public_key: bytes | None = None
    # Origin EXTERNAL: KEY_MATERIAL_EXPIRES / KEY_MATERIAL_DOES_NOT_EXPIRE and ValidTo of the
    # current import, and the HSM-computed check value of the first imported material.
    expiration_model: str | None = None
    valid_to: float | None = None
    material_check: str | None = None
    # The custom key store the key lives in (its material is wrapped under the store's key).
    custom_key_store_id: str | None = None

    @property
    def arn(self) -> str:
        return key_arn(self.region, self.account_id, self.key_id)

    @property
    def current_backing_key(self) -> BackingKey:
        return self.backing_keys[-1]

    def backing_key(self, version: int) -> BackingKey | None:
        for backing in self.backing_keys:
            if backing.version == version:
                return backing
        return None


@dataclass(frozen=True)
class ImportParameters:
    """The latest GetParametersForImport answer for one EXTERNAL key."""

    key_id: str
    token_id: bytes
    wrapping_algorithm: str
    wrapping_key_spec: str
    wrapped_private: bytes  # the RSA wrapping private key, wrapped under the domain key
    public_key: bytes
    expires_at: float


STORE_CONNECTED = "CONNECTED"
STORE_DISCONNECTED = "DISCONNECTED"
STORE_FAILED = "FAILED"
STORE_TYPE_CLOUDHSM = "AWS_CLOUDHSM"


@dataclass(frozen=True)
class CustomKeyStoreRecord:
    """A CloudHSM-type custom key store. kmsd's "cluster" is a PKCS#11 token whose label is
    the CloudHsmClusterId, present on every node and holding the same store key; the
    KeyStorePassword is that token's user PIN, kept only sealed under the domain key."""

    store_id: str
    region: str
    account_id: str
    name: str
    store_type: str
    cluster_id: str
    trust_anchor: str
    sealed_password: bytes
    connection_state: str
    created_at: float
    error_code: str | None = None
    # The store key's check value, recorded at the first successful connection.
    key_check: str | None = None


@dataclass(frozen=True)
class AliasRecord:
    region: str
    alias_name: str
    target_key_id: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class AccessKeyRecord:
    access_key_id: str
    principal_arn: str
    account_id: str
    wrapped_secret: bytes
    created_at: float


@dataclass(frozen=True)
class PrincipalRecord:
    arn: str
    account_id: str
    kind: str  # "root", "user" or "role"
    name: str
    created_at: float
    # Identity policies: (policy name, JSON document), sorted by name.
    policies: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GrantRecord:
    grant_id: str
    grant_token: str
    key_id: str
    name: str
    grantee_principal: str
    retiring_principal: str
    operations: tuple[str, ...]
    encryption_context_equals: tuple[tuple[str, str], ...] | None
    encryption_context_subset: tuple[tuple[str, str], ...] | None
    issuing_account: str
    created_at: float


@dataclass(frozen=True)
class KeyUsage:
    """The last successful cryptographic use of a key (GetKeyLastUsage)."""

    operation: str
    event_time: str
    event_id: str
    request_id: str


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    az: str
    raft_address: str
    api_url: str
    admin_url: str


@dataclass(frozen=True)
class Rejected:
    """A command the state machine refused; names the AWS error type to answer."""

    error_type: str
    message: str


@dataclass(frozen=True)
class Applied:
    value: Any = None


@dataclass(frozen=True)
class MaterialDeleted:
    """DeleteImportedKeyMaterial's result: the key as it is now, and the wrapped material it
    no longer has, so that every node can drop the HSM handles it holds for that material."""

    record: KeyRecord
    removed: tuple[bytes, ...]


ApplyResult = Applied | Rejected


def _same_grant(a: GrantRecord, b: GrantRecord) -> bool:
    return (a.grantee_principal, a.retiring_principal, a.operations,
            a.encryption_context_equals, a.encryption_context_subset) == (
        b.grantee_principal, b.retiring_principal, b.operations,
        b.encryption_context_equals, b.encryption_context_subset)


def key_arn(region: str, account_id: str, key_id: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:key/{key_id}"


def alias_arn(region: str, account_id: str, alias_name: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:{alias_name}"


class _Refuse(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.rejected = Rejected(error_type, message)


def audit_usage(cmd: c.AppendAudit, records: Sequence[ChainedRecord]
                ) -> list[tuple[str, ...]]:
    """The key uses an applied AppendAudit records: the usage of each entry not revoked."""
    return [usage for (_e, _n, _d, usage), record in zip(cmd.entries, records, strict=True)
            if usage and not record.revoked]


class KmsState(dg.DomainGenerationsMixin):
    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.aliases: dict[tuple[str, str], AliasRecord] = {}
        self.access_keys: dict[str, AccessKeyRecord] = {}
        self.principals: dict[str, PrincipalRecord] = {}
        self.grants: dict[str, GrantRecord] = {}
        # Key id -> its current import parameters (EXTERNAL keys only).
        self.import_parameters: dict[str, ImportParameters] = {}
        self.custom_key_stores: dict[str, CustomKeyStoreRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        # Join tokens by SHA-256: (expiry, node id that used it or "").
        self.join_tokens: dict[str, tuple[float, str]] = {}
        self.domain_generations: dict[int, dg.DomainGeneration] = {}
        self.domain_rotation_requested_at: float | None = None
        self.audit = AuditChain()
        # (wrapped private key, DER public key) of the audit digest signing key.
        self.audit_signing_key: tuple[bytes, bytes] | None = None
        self.key_usage: dict[str, KeyUsage] = {}
        # When this replica's usage tracking began (the first audit batch it saw applied).
        self.usage_tracking_start: str | None = None
        self.applied_count = 0

    # -- apply ---------------------------------------------------------------

    def apply(self, command: c.Command) -> ApplyResult:
        self.applied_count += 1
        handler = getattr(self, "_apply_" + command.op, None)
        if handler is None:
            return Rejected("KMSInternalException", f"unknown command {command.op}")
        try:
            return Applied(handler(command))
        except _Refuse as refusal:
            return refusal.rejected
        except dg.Refused as refusal:
            return Rejected(refusal.error_type, refusal.message)

    def _apply_Barrier(self, cmd: c.Barrier) -> None:
        return None

    def _apply_SetAuditSigningKey(self, cmd: c.SetAuditSigningKey) -> tuple[bytes, bytes]:
        if self.audit_signing_key is None:
            self.require_live_blob(dg.AUDIT_SIGNING_KEY, cmd.wrapped_private)
            self.audit_signing_key = (cmd.wrapped_private, cmd.public_key)
        return self.audit_signing_key

    def _apply_AppendAudit(self, cmd: c.AppendAudit) -> list[ChainedRecord]:
        """Chain a batch. A decision whose key changed since it was made is revoked here,
        at this log position, on every replica alike (the commit-time re-check)."""
        entries = []
        for event_bytes, node, decisions, _usage in cmd.entries:
            revoked = False
            for key_id, epoch in decisions:
                record = self.keys.get(key_id)
                revoked = revoked or record is None or record.epoch != epoch
            entries.append(AuditEntry(event_bytes, node, revoked))
        try:
            records = self.audit.append(entries)
        except CanonicalEncodingError as exc:
            raise _Refuse("KMSInternalException", f"unfit audit batch: {exc}") from None
        self.note_key_usage(audit_usage(cmd, records))
        return records

    def note_key_usage(self, usages: Iterable[Sequence[str]]) -> None:
        """The keys' last use, from (key id, operation, event time, event id, request id).
        What an applied AppendAudit changes besides the chain (see `audit_usage`): a copy of
        the state that does not keep the chain (an API worker's) is given only this."""
        for key_id, operation, event_time, event_id, request_id in usages:
            self.key_usage[key_id] = KeyUsage(operation, event_time, event_id, request_id)
            if self.usage_tracking_start is None:
                self.usage_tracking_start = event_time

    def _apply_RegisterNode(self, cmd: c.RegisterNode) -> None:
        self.nodes[cmd.node_id] = NodeRecord(cmd.node_id, cmd.az, cmd.raft_address,
                                             cmd.api_url, cmd.admin_url)

    def _apply_RestoreSnapshot(self, cmd: c.RestoreSnapshot) -> int:
        if self.keys:
            raise _Refuse("ConflictException", "A snapshot is only restored into a cluster "
                                               "that has no keys.")
        saved = KmsState()
        try:
            saved.restore_snapshot(cmd.snapshot)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            raise _Refuse("ValidationException", "Not a kmsd state snapshot.") from None
        live = [(g.generation, g.check) for g in self.generations_in(*dg.LIVE)]
        for generation in sorted({b.generation for b in dg.stored_blobs(saved)}):
            theirs = saved.domain_generations.get(generation)
            ours = self.domain_generations.get(generation)
            if (theirs is None or ours is None or ours.state not in dg.LIVE
                    or theirs.check != ours.check):
                raise _Refuse("ValidationException",
                              "The snapshot's key material is wrapped under another domain key "
                              f"(generation {generation}, "
                              f"{theirs.check if theirs else 'unknown'}); this cluster's "
                              f"live generations are {live}.")
        # This cluster keeps its own members, audit chain and credentials made so far.
        self.keys = dict(saved.keys)
        self.custom_key_stores = dict(saved.custom_key_stores)
        self.aliases = dict(saved.aliases)
        self.grants = dict(saved.grants)
        self.key_usage = dict(saved.key_usage)
        self.principals = {**saved.principals, **self.principals}
        self.access_keys = {**saved.access_keys, **self.access_keys}
        return len(self.keys)

    def _apply_CreateJoinToken(self, cmd: c.CreateJoinToken) -> None:
        self.join_tokens[cmd.token_hash] = (cmd.expires_at, "")

    def _apply_ConsumeJoinToken(self, cmd: c.ConsumeJoinToken) -> None:
        entry = self.join_tokens.get(cmd.token_hash)
        if entry is None or entry[1] or entry[0] < cmd.at:
            raise _Refuse("AccessDeniedException", "The join token is unknown, used or expired.")
        self.join_tokens[cmd.token_hash] = (entry[0], cmd.node_id)

    def _apply_DeregisterNode(self, cmd: c.DeregisterNode) -> None:
        if self.nodes.pop(cmd.node_id, None) is None:
            raise _Refuse("NotFoundException", f"No member named {cmd.node_id}.")

    def _apply_PutAccessKey(self, cmd: c.PutAccessKey) -> bool:
        if cmd.access_key_id in self.access_keys:
            return False
        self.require_live_blob(dg.ACCESS_KEY_SECRET, cmd.wrapped_secret)
        self.access_keys[cmd.access_key_id] = AccessKeyRecord(
            cmd.access_key_id, cmd.principal_arn, cmd.account_id, cmd.wrapped_secret, cmd.at)
        return True

    def _apply_PutPrincipal(self, cmd: c.PutPrincipal) -> PrincipalRecord:
        existing = self.principals.get(cmd.arn)
        if existing is not None:
            return existing
        record = PrincipalRecord(cmd.arn, cmd.account_id, cmd.kind, cmd.name, cmd.at)
        self.principals[cmd.arn] = record
        return record

    def _apply_DeletePrincipal(self, cmd: c.DeletePrincipal) -> None:
        if self.principals.pop(cmd.arn, None) is None:
            raise _Refuse("NotFoundException", f"Principal {cmd.arn} does not exist.")
        for access_key_id, key in list(self.access_keys.items()):
            if key.principal_arn == cmd.arn:
                del self.access_keys[access_key_id]

    def _apply_DeleteAccessKey(self, cmd: c.DeleteAccessKey) -> None:
        if self.access_keys.pop(cmd.access_key_id, None) is None:
            raise _Refuse("NotFoundException", f"Access key {cmd.access_key_id} does not exist.")

    def _principal(self, arn: str) -> PrincipalRecord:
        record = self.principals.get(arn)
        if record is None:
            raise _Refuse("NotFoundException", f"Principal {arn} does not exist.")
        return record

    def _apply_PutPrincipalPolicy(self, cmd: c.PutPrincipalPolicy) -> PrincipalRecord:
        record = self._principal(cmd.arn)
        policies = dict(record.policies)
        policies[cmd.policy_name] = cmd.document
        record = dataclasses.replace(record, policies=tuple(sorted(policies.items())))
        self.principals[cmd.arn] = record
        self._bump_all_epochs()
        return record

    def _apply_DeletePrincipalPolicy(self, cmd: c.DeletePrincipalPolicy) -> PrincipalRecord:
        record = self._principal(cmd.arn)
        if cmd.policy_name not in dict(record.policies):
            raise _Refuse("NotFoundException", f"Policy {cmd.policy_name} is not attached.")
        record = dataclasses.replace(
            record, policies=tuple(p for p in record.policies if p[0] != cmd.policy_name))
        self.principals[cmd.arn] = record
        self._bump_all_epochs()
        return record

    def _bump_all_epochs(self) -> None:
        # An identity policy can touch any key: every decision in flight is re-checked.
        for key_id, record in list(self.keys.items()):
            self.keys[key_id] = dataclasses.replace(record, epoch=record.epoch + 1)

    def _apply_PutKeyPolicy(self, cmd: c.PutKeyPolicy) -> KeyRecord:
        record = self._key(cmd.key_id)
        return self._put(dataclasses.replace(record, policy=cmd.policy, epoch=record.epoch + 1))

    def _apply_CreateGrant(self, cmd: c.CreateGrant) -> GrantRecord:
        record = self._key(cmd.key_id)
        if record.key_state == KEY_STATE_PENDING_DELETION:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is pending deletion.")
        if record.key_state == KEY_STATE_DISABLED:
            raise _Refuse("DisabledException", f"{record.arn} is disabled.")
        if record.key_state == KEY_STATE_PENDING_IMPORT:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is pending import.")
        on_key = [g for g in self.grants.values() if g.key_id == cmd.key_id]
        grant = GrantRecord(
            cmd.grant_id, cmd.grant_token, cmd.key_id, cmd.name, cmd.grantee_principal,
            cmd.retiring_principal, cmd.operations, cmd.encryption_context_equals,
            cmd.encryption_context_subset, cmd.issuing_account, cmd.at)
        if cmd.name:
            # AWS: a grant with the same name and parameters is the same grant.
            for existing in on_key:
                if existing.name == cmd.name and _same_grant(existing, grant):
                    return existing
        if len(on_key) >= cmd.max_grants_per_key:
            raise _Refuse("LimitExceededException",
                          f"{record.arn} has reached the limit of {cmd.max_grants_per_key} grants.")
        if sum(g.grantee_principal == cmd.grantee_principal
               for g in on_key) >= cmd.max_grants_per_grantee:
            raise _Refuse("LimitExceededException",
                          f"{cmd.grantee_principal} has reached the limit of "
                          f"{cmd.max_grants_per_grantee} grants on {record.arn}.")
        self.grants[cmd.grant_id] = grant
        return grant

    def _apply_RemoveGrant(self, cmd: c.RemoveGrant) -> GrantRecord:
        grant = self.grants.get(cmd.grant_id)
        if grant is None or grant.key_id != cmd.key_id:
            raise _Refuse("NotFoundException", f"Grant ID {cmd.grant_id} not found")
        del self.grants[cmd.grant_id]
        record = self.keys.get(cmd.key_id)
        if record is not None:
            self._put(dataclasses.replace(record, epoch=record.epoch + 1))
        return grant

    def _apply_CreateKey(self, cmd: c.CreateKey) -> KeyRecord:
        if cmd.key_id in self.keys:
            raise _Refuse("AlreadyExistsException", f"Key '{cmd.key_id}' already exists")
        if cmd.custom_key_store_id is not None:
            store = self._store(cmd.custom_key_store_id)
            if store.connection_state != STORE_CONNECTED:
                raise _Refuse("CustomKeyStoreInvalidStateException",
                              f"Custom key store {store.store_id} is not connected "
                              f"({store.connection_state}).")
        elif cmd.origin != ORIGIN_EXTERNAL:
            # A store key's backing key is wrapped under the store's own key, which no
            # domain-key generation names.
            self.require_live_blob(dg.BACKING_KEY, cmd.wrapped_backing_key)
        record = KeyRecord(
            key_id=cmd.key_id, region=cmd.region, account_id=cmd.account_id,
            description=cmd.description, key_usage=cmd.key_usage, key_spec=cmd.key_spec,
            origin=cmd.origin, policy=cmd.policy, tags=cmd.tags, created_at=cmd.at,
            key_state=KEY_STATE_ENABLED,
            backing_keys=(BackingKey(1, cmd.wrapped_backing_key, cmd.at),), epoch=1,
            public_key=cmd.public_key, custom_key_store_id=cmd.custom_key_store_id)
        if cmd.origin == ORIGIN_EXTERNAL:
            # No material until ImportKeyMaterial.
            record = dataclasses.replace(record, key_state=KEY_STATE_PENDING_IMPORT,
                                         backing_keys=())
        self.keys[cmd.key_id] = record
        return record

    def _apply_SetKeyEnabled(self, cmd: c.SetKeyEnabled) -> KeyRecord:
        record = self._key(cmd.key_id)
        if record.key_state == KEY_STATE_PENDING_DELETION:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is pending deletion.")
        if record.key_state == KEY_STATE_PENDING_IMPORT:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is pending import.")
        new_state = KEY_STATE_ENABLED if cmd.enabled else KEY_STATE_DISABLED
        if new_state != record.key_state:
            record = dataclasses.replace(record, key_state=new_state, epoch=record.epoch + 1)
            self.keys[cmd.key_id] = record
        return record

    def _apply_CreateAlias(self, cmd: c.CreateAlias) -> AliasRecord:
        target = self._key(cmd.target_key_id)
        if (cmd.region, cmd.alias_name) in self.aliases:
            name = alias_arn(cmd.region, target.account_id, cmd.alias_name)
            raise _Refuse("AlreadyExistsException", f"An alias with the name {name} already exists")
        self._require_alias_target(target, cmd.region)
        alias = AliasRecord(cmd.region, cmd.alias_name, cmd.target_key_id, cmd.at, cmd.at)
        self.aliases[(cmd.region, cmd.alias_name)] = alias
        return alias

    def _apply_UpdateAlias(self, cmd: c.UpdateAlias) -> AliasRecord:
        target = self._key(cmd.target_key_id)
        current = self.aliases.get((cmd.region, cmd.alias_name))
        if current is None:
            raise _Refuse("NotFoundException",
                          f"Alias {alias_arn(cmd.region, target.account_id, cmd.alias_name)}"
                          " is not found.")
        self._require_alias_target(target, cmd.region)
        alias = dataclasses.replace(current, target_key_id=cmd.target_key_id, updated_at=cmd.at)
        self.aliases[(cmd.region, cmd.alias_name)] = alias
        return alias

    def _apply_DeleteAlias(self, cmd: c.DeleteAlias) -> None:
        if self.aliases.pop((cmd.region, cmd.alias_name), None) is None:
            raise _Refuse("NotFoundException", f"Alias {cmd.alias_name} is not found.")

    def _apply_UpdateKeyDescription(self, cmd: c.UpdateKeyDescription) -> KeyRecord:
        record = self._key_not_pending_deletion(cmd.key_id)
        return self._put(dataclasses.replace(record, description=cmd.description))

    def _apply_TagKey(self, cmd: c.TagKey) -> KeyRecord:
        record = self._key_not_pending_deletion(cmd.key_id)
        tags = dict(record.tags)
        tags.update(dict(cmd.tags))
        if len(tags) > cmd.max_tags:
            raise _Refuse("LimitExceededException",
                          f"A KMS key can have at most {cmd.max_tags} tags.")
        return self._put(dataclasses.replace(record, tags=tuple(sorted(tags.items()))))

    def _apply_UntagKey(self, cmd: c.UntagKey) -> KeyRecord:
        record = self._key_not_pending_deletion(cmd.key_id)
        removed = set(cmd.tag_keys)
        return self._put(dataclasses.replace(
            record, tags=tuple(t for t in record.tags if t[0] not in removed)))

    def _apply_ScheduleKeyDeletion(self, cmd: c.ScheduleKeyDeletion) -> KeyRecord:
        record = self._key_not_pending_deletion(cmd.key_id)
        return self._put(dataclasses.replace(
            record, key_state=KEY_STATE_PENDING_DELETION, deletion_date=cmd.deletion_date,
            pending_window_days=cmd.pending_window_days, epoch=record.epoch + 1))

    def _apply_CancelKeyDeletion(self, cmd: c.CancelKeyDeletion) -> KeyRecord:
        record = self._key(cmd.key_id)
        if record.key_state != KEY_STATE_PENDING_DELETION:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is not pending deletion.")
        # AWS: a key whose deletion is cancelled comes back Disabled (PendingImport if it has
        # no key material).
        return self._put(dataclasses.replace(
            record,
            key_state=KEY_STATE_DISABLED if record.backing_keys else KEY_STATE_PENDING_IMPORT,
            deletion_date=None, pending_window_days=None,
            epoch=record.epoch + 1))

    def _apply_DeleteKey(self, cmd: c.DeleteKey) -> KeyRecord | None:
        """Removes the key and its aliases; returns the removed record (None if not due)."""
        record = self.keys.get(cmd.key_id)
        if (record is None or record.key_state != KEY_STATE_PENDING_DELETION
                or record.deletion_date is None or record.deletion_date > cmd.at):
            return None
        del self.keys[cmd.key_id]
        self.key_usage.pop(cmd.key_id, None)
        self.import_parameters.pop(cmd.key_id, None)
        for grant_id, grant in list(self.grants.items()):
            if grant.key_id == cmd.key_id:
                del self.grants[grant_id]
        for name, alias in list(self.aliases.items()):
            if alias.target_key_id == cmd.key_id:
                del self.aliases[name]
        return record

    def _apply_SetKeyRotation(self, cmd: c.SetKeyRotation) -> KeyRecord:
        record = self._key_usable_for_management(cmd.key_id)
        if not cmd.enabled:
            return self._put(dataclasses.replace(
                record, rotation_enabled=False, next_rotation_at=None))
        automatic = [b for b in record.backing_keys if b.rotation_type == ROTATION_AUTOMATIC]
        since = automatic[-1].created_at if automatic and record.rotation_enabled else cmd.at
        return self._put(dataclasses.replace(
            record, rotation_enabled=True, rotation_period_days=cmd.period_days,
            next_rotation_at=since + cmd.period_days * SECONDS_PER_DAY))

    def _apply_RotateKey(self, cmd: c.RotateKey) -> KeyRecord | None:
        record = self._key_usable_for_management(cmd.key_id)
        if record.custom_key_store_id is not None:
            # AWS RotateKeyOnDemand / EnableKeyRotation: not for KMS keys in a custom key
            # store. Here too because a domain-wrapped version would sit among its
            # store-wrapped ones, where no domain-key rotation looks.
            raise _Refuse("UnsupportedOperationException",
                          f"{record.arn} is in a custom key store and cannot be rotated.")
        if cmd.rotation_type == ROTATION_AUTOMATIC and not record.rotation_enabled:
            return None  # rotation was disabled after the scheduler proposed this one
        if record.current_backing_key.version != cmd.expected_version:
            if cmd.rotation_type == ROTATION_AUTOMATIC:
                return None  # another leader's rotation won the race; nothing to do
            raise _Refuse("ConflictException",
                          f"{record.arn} was rotated concurrently; retry the request.")
        if cmd.rotation_type == ROTATION_ON_DEMAND:
            done = sum(b.rotation_type == ROTATION_ON_DEMAND for b in record.backing_keys)
            if done >= cmd.max_on_demand:
                raise _Refuse("LimitExceededException",
                              f"{record.arn} has reached the limit of {cmd.max_on_demand}"
                              " on-demand rotations.")
        self.require_live_blob(dg.BACKING_KEY, cmd.wrapped_backing_key)
        backing = BackingKey(cmd.expected_version + 1, cmd.wrapped_backing_key, cmd.at,
                             cmd.rotation_type)
        updated = dataclasses.replace(record, backing_keys=(*record.backing_keys, backing))
        if cmd.rotation_type == ROTATION_AUTOMATIC and record.rotation_period_days:
            updated = dataclasses.replace(
                updated, next_rotation_at=cmd.at + record.rotation_period_days * SECONDS_PER_DAY)
        return self._put(updated)

    # -- custom key stores ----------------------------------------------------

    def _store(self, store_id: str) -> CustomKeyStoreRecord:
        store = self.custom_key_stores.get(store_id)
        if store is None:
            raise _Refuse("CustomKeyStoreNotFoundException",
                          f"Custom key store {store_id} does not exist.")
        return store

    def _check_store_names(self, store: CustomKeyStoreRecord) -> None:
        for other in self.custom_key_stores.values():
            if other.store_id == store.store_id or (other.region, other.account_id) != (
                    store.region, store.account_id):
                continue
            if other.name == store.name:
                raise _Refuse("CustomKeyStoreNameInUseException",
                              f"The custom key store name {store.name} is already in use.")
            if other.cluster_id == store.cluster_id:
                raise _Refuse("CloudHsmClusterInUseException",
                              f"{store.cluster_id} is already associated with custom key "
                              f"store {other.store_id}.")

    def _apply_CreateCustomKeyStore(self, cmd: c.CreateCustomKeyStore) -> CustomKeyStoreRecord:
        store = CustomKeyStoreRecord(
            cmd.store_id, cmd.region, cmd.account_id, cmd.name, STORE_TYPE_CLOUDHSM,
            cmd.cluster_id, cmd.trust_anchor, cmd.sealed_password, STORE_DISCONNECTED, cmd.at)
        if cmd.store_id in self.custom_key_stores:
            raise _Refuse("KMSInternalException", f"Custom key store {cmd.store_id} exists.")
        self._check_store_names(store)
        if sum((s.region, s.account_id) == (cmd.region, cmd.account_id)
               for s in self.custom_key_stores.values()) >= cmd.max_stores:
            raise _Refuse("LimitExceededException",
                          f"An account can have at most {cmd.max_stores} custom key stores "
                          "in a region.")
        self.require_live_blob(dg.CUSTOM_KEY_STORE_PASSWORD, cmd.sealed_password)
        self.custom_key_stores[cmd.store_id] = store
        return store

    def _apply_UpdateCustomKeyStore(self, cmd: c.UpdateCustomKeyStore) -> CustomKeyStoreRecord:
        store = self._store(cmd.store_id)
        # AWS: only the name may change while connected; everything else needs DISCONNECTED.
        if (cmd.cluster_id is not None or cmd.sealed_password is not None) and \
                store.connection_state != STORE_DISCONNECTED:
            raise _Refuse("CustomKeyStoreInvalidStateException",
                          f"Custom key store {store.store_id} must be disconnected to change "
                          "its CloudHSM cluster or password.")
        if cmd.new_name is not None and store.connection_state not in (STORE_DISCONNECTED,
                                                                       STORE_CONNECTED):
            raise _Refuse("CustomKeyStoreInvalidStateException",
                          f"Custom key store {store.store_id} is {store.connection_state}.")
        updated = dataclasses.replace(
            store, name=cmd.new_name if cmd.new_name is not None else store.name,
            cluster_id=cmd.cluster_id if cmd.cluster_id is not None else store.cluster_id,
            sealed_password=(cmd.sealed_password if cmd.sealed_password is not None
                             else store.sealed_password))
        self._check_store_names(updated)
        if cmd.sealed_password is not None:
            self.require_live_blob(dg.CUSTOM_KEY_STORE_PASSWORD, cmd.sealed_password)
        self.custom_key_stores[store.store_id] = updated
        return updated

    def _apply_SetCustomKeyStoreConnection(self, cmd: c.SetCustomKeyStoreConnection
                                           ) -> CustomKeyStoreRecord:
        store = self._store(cmd.store_id)
        if cmd.connection_state == STORE_DISCONNECTED:
            if store.connection_state == STORE_DISCONNECTED:
                raise _Refuse("CustomKeyStoreInvalidStateException",
                              f"Custom key store {store.store_id} is already disconnected.")
            updated = dataclasses.replace(store, connection_state=STORE_DISCONNECTED,
                                          error_code=None)
        elif cmd.connection_state in (STORE_CONNECTED, STORE_FAILED):
            if store.connection_state == STORE_FAILED:
                raise _Refuse("CustomKeyStoreInvalidStateException",
                              f"Custom key store {store.store_id} is FAILED: disconnect it, "
                              "then connect it.")
            if (cmd.connection_state == STORE_CONNECTED and store.key_check is not None
                    and cmd.key_check != store.key_check):
                # Another token, or another store key, than the one the store's keys need.
                updated = dataclasses.replace(store, connection_state=STORE_FAILED,
                                              error_code="CLUSTER_NOT_FOUND")
            else:
                updated = dataclasses.replace(
                    store, connection_state=cmd.connection_state,
                    error_code=cmd.error_code if cmd.connection_state == STORE_FAILED else None,
                    key_check=store.key_check or (
                        cmd.key_check if cmd.connection_state == STORE_CONNECTED else None))
        else:
            raise _Refuse("KMSInternalException",
                          f"unknown connection state {cmd.connection_state}")
        self.custom_key_stores[store.store_id] = updated
        return updated

    def _apply_DeleteCustomKeyStore(self, cmd: c.DeleteCustomKeyStore) -> CustomKeyStoreRecord:
        store = self._store(cmd.store_id)
        if store.connection_state != STORE_DISCONNECTED:
            raise _Refuse("CustomKeyStoreInvalidStateException",
                          f"Custom key store {store.store_id} must be disconnected before it "
                          "is deleted.")
        if any(k.custom_key_store_id == store.store_id for k in self.keys.values()):
            raise _Refuse("CustomKeyStoreHasCMKsException",
                          f"Custom key store {store.store_id} contains KMS keys; delete them "
                          "(ScheduleKeyDeletion) first.")
        del self.custom_key_stores[store.store_id]
        return store

    # -- imported key material (Origin EXTERNAL) ------------------------------

    def _external_key(self, key_id: str) -> KeyRecord:
        record = self._key_not_pending_deletion(key_id)
        if record.origin != ORIGIN_EXTERNAL:
            raise _Refuse("UnsupportedOperationException",
                          f"{record.arn} origin is {record.origin} which is not valid for "
                          "this operation.")
        return record

    def _apply_SetImportParameters(self, cmd: c.SetImportParameters) -> ImportParameters:
        self._external_key(cmd.key_id)
        self.require_live_blob(dg.IMPORT_WRAPPING_KEY, cmd.wrapped_private)
        parameters = ImportParameters(cmd.key_id, cmd.token_id, cmd.wrapping_algorithm,
                                      cmd.wrapping_key_spec, cmd.wrapped_private,
                                      cmd.public_key, cmd.expires_at)
        self.import_parameters[cmd.key_id] = parameters
        return parameters

    def _apply_ImportKeyMaterial(self, cmd: c.ImportKeyMaterial) -> KeyRecord:
        record = self._external_key(cmd.key_id)
        parameters = self.import_parameters.get(cmd.key_id)
        if parameters is None or not hmac.compare_digest(parameters.token_id, cmd.token_id):
            raise _Refuse("InvalidImportTokenException",
                          "The import token is not valid for this KMS key.")
        if parameters.expires_at < cmd.at:
            raise _Refuse("ExpiredImportTokenException", "The import token has expired.")
        if record.material_check is not None and not hmac.compare_digest(
                record.material_check, cmd.material_check):
            raise _Refuse("IncorrectKeyMaterialException",
                          f"The key material is not the key material previously imported "
                          f"into {record.arn}.")
        asymmetric = record.key_spec != "SYMMETRIC_DEFAULT" and \
            not record.key_spec.startswith("HMAC_")
        if asymmetric != (cmd.public_key is not None):
            # An asymmetric key's material always comes with the public key derived from it.
            raise _Refuse("KMSInternalException",
                          f"The import into {record.arn} does not fit its key spec.")
        if (record.public_key is not None and cmd.public_key is not None
                and record.public_key != cmd.public_key):
            raise _Refuse("IncorrectKeyMaterialException",
                          f"The key material is not the key material previously imported "
                          f"into {record.arn}.")
        if not record.backing_keys:
            self.require_live_blob(dg.BACKING_KEY, cmd.wrapped_backing_key)
        backing_keys = record.backing_keys or (BackingKey(1, cmd.wrapped_backing_key, cmd.at),)
        key_state = (KEY_STATE_ENABLED if record.key_state == KEY_STATE_PENDING_IMPORT
                     else record.key_state)
        return self._put(dataclasses.replace(
            record, backing_keys=backing_keys, key_state=key_state,
            expiration_model=cmd.expiration_model, valid_to=cmd.valid_to,
            material_check=cmd.material_check,
            public_key=record.public_key or cmd.public_key, epoch=record.epoch + 1))

    def _apply_DeleteImportedKeyMaterial(self, cmd: c.DeleteImportedKeyMaterial
                                         ) -> MaterialDeleted | None:
        """The updated key and its removed material, or None for an expiry that is not (or no
        longer) due."""
        if cmd.expired_only:
            record = self.keys.get(cmd.key_id)
            if (record is None or record.origin != ORIGIN_EXTERNAL or not record.backing_keys
                    or record.key_state == KEY_STATE_PENDING_DELETION
                    or record.valid_to is None or record.valid_to > cmd.at):
                return None
        else:
            record = self._external_key(cmd.key_id)
        removed = tuple(b.wrapped for b in record.backing_keys)
        return MaterialDeleted(self._put(dataclasses.replace(
            record, backing_keys=(), key_state=KEY_STATE_PENDING_IMPORT,
            expiration_model=None, valid_to=None, epoch=record.epoch + 1)), removed)

    def _put(self, record: KeyRecord) -> KeyRecord:
        self.keys[record.key_id] = record
        return record

    def _key_not_pending_deletion(self, key_id: str) -> KeyRecord:
        record = self._key(key_id)
        if record.key_state == KEY_STATE_PENDING_DELETION:
            raise _Refuse("KMSInvalidStateException", f"{record.arn} is pending deletion.")
        return record

    def _key_usable_for_management(self, key_id: str) -> KeyRecord:
        record = self._key_not_pending_deletion(key_id)
        if record.key_state == KEY_STATE_DISABLED:
            raise _Refuse("DisabledException", f"{record.arn} is disabled.")
        return record

    def _key(self, key_id: str) -> KeyRecord:
        record = self.keys.get(key_id)
        if record is None:
            raise _Refuse("NotFoundException", f"Key '{key_id}' does not exist")
        return record

    @staticmethod
    def _require_alias_target(target: KeyRecord, region: str) -> None:
        if target.region != region:
            raise _Refuse("NotFoundException", f"Key '{target.key_id}' does not exist")
        if target.key_state == KEY_STATE_PENDING_DELETION:
            raise _Refuse("KMSInvalidStateException", f"{target.arn} is pending deletion.")

    # -- snapshots -----------------------------------------------------------

    def to_snapshot(self) -> bytes:
        """The whole state as msgpack: what pysyncobj writes into its full dump."""
        def records(table: dict[Any, Any]) -> list[dict[str, Any]]:
            # Sorted, so that replicas holding the same state give the same bytes.
            return [dataclasses.asdict(v) for _, v in sorted(list(table.items()))]

        return msgpack.packb({
            "v": c.SCHEMA_VERSION,
            "keys": records(self.keys),
            "aliases": records(self.aliases),
            "access_keys": records(self.access_keys),
            "principals": records(self.principals),
            "grants": records(self.grants),
            "import_parameters": records(self.import_parameters),
            "custom_key_stores": records(self.custom_key_stores),
            "nodes": records(self.nodes),
            "join_tokens": {k: list(v) for k, v in sorted(self.join_tokens.items())},
            "domain_key_check": self.domain_key_check,
            "domain_generations": self.generations_snapshot(),
            "domain_rotation_requested_at": self.domain_rotation_requested_at,
            "audit": self.audit.to_snapshot(),
            "audit_signing_key": (list(self.audit_signing_key)
                                  if self.audit_signing_key else None),
            "key_usage": {k: dataclasses.asdict(v) for k, v in sorted(self.key_usage.items())},
            "usage_tracking_start": self.usage_tracking_start,
            "applied_count": self.applied_count,
        }, use_bin_type=True)

    def restore_snapshot(self, data: bytes) -> None:
        raw = msgpack.unpackb(data, raw=False)
        keys = {}
        for k in raw["keys"]:
            k["backing_keys"] = tuple(BackingKey(**b) for b in k["backing_keys"])
            k["tags"] = tuple(tuple(t) for t in k["tags"])
            keys[k["key_id"]] = KeyRecord(**k)
        aliases = {(a["region"], a["alias_name"]): AliasRecord(**a) for a in raw["aliases"]}
        access_keys = {a["access_key_id"]: AccessKeyRecord(**a) for a in raw["access_keys"]}
        nodes = {n["node_id"]: NodeRecord(**n) for n in raw["nodes"]}
        principals = {}
        for p in raw.get("principals", []):
            p["policies"] = tuple(tuple(x) for x in p["policies"])
            principals[p["arn"]] = PrincipalRecord(**p)
        grants = {}
        for g in raw.get("grants", []):
            g["operations"] = tuple(g["operations"])
            for name in ("encryption_context_equals", "encryption_context_subset"):
                if g[name] is not None:
                    g[name] = tuple(tuple(x) for x in g[name])
            grants[g["grant_id"]] = GrantRecord(**g)
        import_parameters = {p["key_id"]: ImportParameters(**p)
                             for p in raw.get("import_parameters", [])}
        custom_key_stores = {k["store_id"]: CustomKeyStoreRecord(**k)
                             for k in raw.get("custom_key_stores", [])}
        # Whole dicts are swapped in, never mutated, so concurrent readers see old or new.
        self.keys, self.aliases, self.access_keys, self.nodes = keys, aliases, access_keys, nodes
        self.principals, self.grants = principals, grants
        self.import_parameters = import_parameters
        self.custom_key_stores = custom_key_stores
        self.join_tokens = {k: (v[0], v[1]) for k, v in raw.get("join_tokens", {}).items()}
        self.domain_generations = self.generations_from_snapshot(raw)
        self.domain_rotation_requested_at = raw.get("domain_rotation_requested_at")
        self.audit = AuditChain.from_snapshot(raw["audit"])
        signing = raw.get("audit_signing_key")
        self.audit_signing_key = (signing[0], signing[1]) if signing else None
        self.key_usage = {k: KeyUsage(**v) for k, v in raw["key_usage"].items()}
        self.usage_tracking_start = raw["usage_tracking_start"]
        self.applied_count = raw["applied_count"]

    def fingerprint(self) -> bytes:
        """Canonical bytes of the state, for comparing replicas."""
        return self.to_snapshot()
