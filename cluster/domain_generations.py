"""Domain-key generations in the replicated state, and the commands of a rotation.

A generation is one AES-256 domain key, held by every member's token. Its life:

    pending   made in one token, being cloned to every member; nothing is
              wrapped under it yet, so it can still be abandoned
    active    every member holds it (ActivateDomainGeneration checked the
              confirmations against the member list); new blobs are wrapped
              under it
    retiring  the previous active generation: it still unwraps, and the
              leader re-wraps its blobs under the active one in batches
    retired   no blob refers to it any more (RetireDomainGeneration checks);
              every token destroys it
    abandoned a pending generation no member could hand on (its maker died);
              the rotation starts over with the next number

At most one rotation runs at a time: a generation can begin only while no
generation is pending or retiring. Every wrapped or sealed blob in the state
names its generation (kmsd.domain_blob); `stored_blobs` lists them all, and a
command that would add a blob of a generation that is neither active nor
retiring is refused, so nothing can come to depend on a generation once it is
retired. Not the backing keys of keys in a custom key store: those are wrapped
under the store's own key in its token, which no generation names (read as a
domain blob, such a bare key-wrap blob would pass for generation 1) and no
domain key can re-wrap. A store's KeyStorePassword, sealed under the domain
key, is listed like any other sealed secret.

Pure like the rest of the state machine: no clock, no randomness, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster import commands as c
from kmsd import domain_blob

if TYPE_CHECKING:
    from cluster.state import KmsState

PENDING = "pending"
ACTIVE = "active"
RETIRING = "retiring"
RETIRED = "retired"
ABANDONED = "abandoned"
# Blobs may be wrapped under these; tokens keep pending ones as well.
LIVE = (ACTIVE, RETIRING)

# Locator kinds: where in the state a blob lives.
BACKING_KEY = "backing"
IMPORT_WRAPPING_KEY = "import"
ACCESS_KEY_SECRET = "access"
AUDIT_SIGNING_KEY = "audit"
CUSTOM_KEY_STORE_PASSWORD = "keystore"
_SEALED_KINDS = (ACCESS_KEY_SECRET, CUSTOM_KEY_STORE_PASSWORD)


# Kinds whose blob is one field of one record in a table of the state: (table, field).
_RECORD_FIELDS = {
    IMPORT_WRAPPING_KEY: ("import_parameters", "wrapped_private"),
    ACCESS_KEY_SECRET: ("access_keys", "wrapped_secret"),
    CUSTOM_KEY_STORE_PASSWORD: ("custom_key_stores", "sealed_password"),
}


@dataclass(frozen=True)
class DomainGeneration:
    generation: int
    check: str  # the key's check value (AES-CMAC of a constant), public
    created_at: float
    state: str
    changed_at: float


@dataclass(frozen=True)
class StoredBlob:
    """One wrapped or sealed blob in the state. `key_spec` says what a wrapped blob holds
    (None for a sealed secret and for the audit key, whose spec the proposer knows)."""

    locator: tuple[str, ...]
    blob: bytes
    key_spec: str | None

    @property
    def sealed(self) -> bool:
        return self.locator[0] in _SEALED_KINDS

    @property
    def generation(self) -> int:
        return blob_generation(self.locator[0], self.blob)


def blob_generation(kind: str, blob: bytes) -> int:
    if kind in _SEALED_KINDS:
        return domain_blob.seal_generation(blob)
    return domain_blob.wrap_generation(blob)


def stored_blobs(state: KmsState) -> Iterator[StoredBlob]:
    """Every blob in the state wrapped or sealed under a domain-key generation, in a
    deterministic order."""
    for key_id, record in sorted(list(state.keys.items())):
        if record.custom_key_store_id is not None:
            continue  # wrapped under its store's key (module docstring)
        for backing in record.backing_keys:
            if backing.wrapped:
                yield StoredBlob((BACKING_KEY, key_id, str(backing.version)), backing.wrapped,
                                 record.key_spec)
    for key_id, parameters in sorted(list(state.import_parameters.items())):
        yield StoredBlob((IMPORT_WRAPPING_KEY, key_id), parameters.wrapped_private,
                         parameters.wrapping_key_spec)
    for access_key_id, access_key in sorted(list(state.access_keys.items())):
        yield StoredBlob((ACCESS_KEY_SECRET, access_key_id), access_key.wrapped_secret, None)
    if state.audit_signing_key is not None:
        yield StoredBlob((AUDIT_SIGNING_KEY,), state.audit_signing_key[0], None)
    for store_id, store in sorted(list(state.custom_key_stores.items())):
        yield StoredBlob((CUSTOM_KEY_STORE_PASSWORD, store_id), store.sealed_password, None)


def blobs_by_generation(state: KmsState) -> dict[int, int]:
    counts: dict[int, int] = {}
    for stored in stored_blobs(state):
        counts[stored.generation] = counts.get(stored.generation, 0) + 1
    return counts


class Refused(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class DomainGenerationsMixin:
    """The domain-key part of KmsState: its fields live on KmsState, these are its commands."""

    domain_generations: dict[int, DomainGeneration]
    domain_rotation_requested_at: float | None

    # -- reads -----------------------------------------------------------------

    @property
    def active_generation(self) -> int:
        for generation in list(self.domain_generations.values()):
            if generation.state == ACTIVE:
                return generation.generation
        return domain_blob.FIRST_GENERATION

    @property
    def domain_key_check(self) -> str | None:
        """The active generation's check value (None before InitCluster)."""
        for generation in list(self.domain_generations.values()):
            if generation.state == ACTIVE:
                return generation.check
        return None

    def generations_in(self, *states: str) -> list[DomainGeneration]:
        return sorted((g for g in list(self.domain_generations.values()) if g.state in states),
                      key=lambda g: g.generation)

    @property
    def rotation_in_progress(self) -> bool:
        return bool(self.generations_in(PENDING, RETIRING))

    def require_live_blob(self, kind: str, blob: bytes) -> None:
        """Refuse a new blob wrapped under a generation that is not active or retiring: the
        proposer saw an older state than this log position (retryable)."""
        if not self.domain_generations or not blob:
            return
        generation = self.domain_generations.get(blob_generation(kind, blob))
        if generation is None or generation.state not in LIVE:
            raise Refused("KMSInternalException",
                          "The key material was wrapped under a domain key generation that is "
                          "no longer in use; retry the request.")

    # -- commands --------------------------------------------------------------

    def _apply_InitCluster(self, cmd: c.InitCluster) -> str | None:
        if not self.domain_generations:
            self.domain_generations = {domain_blob.FIRST_GENERATION: DomainGeneration(
                domain_blob.FIRST_GENERATION, cmd.domain_key_check, 0.0, ACTIVE, 0.0)}
        return self.domain_generations[domain_blob.FIRST_GENERATION].check

    def _apply_RequestDomainRotation(self, cmd: c.RequestDomainRotation) -> bool:
        """True if this request starts a rotation; False if one is requested or running."""
        if not self.domain_generations:
            raise Refused("KMSInvalidStateException", "The cluster has no domain key yet.")
        if self.rotation_in_progress or self.domain_rotation_requested_at is not None:
            return False
        self.domain_rotation_requested_at = cmd.at
        return True

    def _apply_BeginDomainRotation(self, cmd: c.BeginDomainRotation) -> DomainGeneration:
        if self.rotation_in_progress:
            raise Refused("ConflictException", "A domain-key rotation is already in progress.")
        expected = max(self.domain_generations, default=0) + 1
        if not self.domain_generations or cmd.generation != expected:
            raise Refused("ConflictException",
                          f"The next domain-key generation is {expected}, not {cmd.generation}.")
        if not cmd.check:
            raise Refused("ValidationException", "A domain-key generation needs a check value.")
        generation = DomainGeneration(cmd.generation, cmd.check, cmd.at, PENDING, cmd.at)
        self.domain_generations = {**self.domain_generations, cmd.generation: generation}
        self.domain_rotation_requested_at = None
        return generation

    def _generation(self, number: int, state: str) -> DomainGeneration:
        generation = self.domain_generations.get(number)
        if generation is None or generation.state != state:
            raise Refused("ConflictException",
                          f"Domain-key generation {number} is not {state}.")
        return generation

    def _set_state(self, generation: DomainGeneration, state: str, at: float) -> None:
        self.domain_generations = {**self.domain_generations, generation.generation:
                                   dataclasses.replace(generation, state=state, changed_at=at)}

    def _apply_AbandonDomainGeneration(self, cmd: c.AbandonDomainGeneration) -> None:
        """The operator's request still stands: the leader begins another generation."""
        self._set_state(self._generation(cmd.generation, PENDING), ABANDONED, cmd.at)
        self.domain_rotation_requested_at = cmd.at

    def _apply_ActivateDomainGeneration(self, cmd: c.ActivateDomainGeneration
                                        ) -> DomainGeneration:
        generation = self._generation(cmd.generation, PENDING)
        missing = sorted(set(self.nodes) - set(cmd.confirmed_members))  # type: ignore[attr-defined]
        if missing:
            raise Refused("ConflictException",
                          f"Members {', '.join(missing)} have not confirmed domain-key "
                          f"generation {cmd.generation}.")
        for previous in self.generations_in(ACTIVE):
            self._set_state(previous, RETIRING, cmd.at)
        self._set_state(generation, ACTIVE, cmd.at)
        return self.domain_generations[cmd.generation]

    def _apply_RewrapDomainBlobs(self, cmd: c.RewrapDomainBlobs) -> tuple[int, int]:
        """Replace each blob that is still exactly `old` by `new` (under the active
        generation); an item whose blob changed or vanished meanwhile is skipped.
        Returns (replaced, skipped)."""
        self._generation(cmd.generation, ACTIVE)
        replaced = skipped = 0
        for locator, old, new in cmd.items:
            kind = locator[0] if locator else ""
            if (blob_generation(kind, new) != cmd.generation
                    or blob_generation(kind, old) == cmd.generation
                    or not self._replace_blob(locator, old, new)):
                skipped += 1
            else:
                replaced += 1
        return replaced, skipped

    def _replace_blob(self, locator: tuple[str, ...], old: bytes, new: bytes) -> bool:
        state: KmsState = self  # type: ignore[assignment]
        kind, rest = locator[0], locator[1:]
        if kind == BACKING_KEY and len(rest) == 2 and rest[1].isdigit():
            record = state.keys.get(rest[0])
            if record is None or record.custom_key_store_id is not None:
                return False
            version = int(rest[1])
            backings = list(record.backing_keys)
            for index, backing in enumerate(backings):
                if backing.version == version and backing.wrapped == old:
                    # The id of the material outlives its wrapping.
                    material_id = backing.material_id or hashlib.sha256(old).hexdigest()
                    backings[index] = dataclasses.replace(backing, wrapped=new,
                                                          material_id=material_id)
                    state.keys[record.key_id] = dataclasses.replace(
                        record, backing_keys=tuple(backings))
                    return True
            return False
        if kind in _RECORD_FIELDS and len(rest) == 1:
            # For a store password this is not UpdateCustomKeyStore: the same password,
            # sealed anew, whatever the store's connection state.
            table_name, field_name = _RECORD_FIELDS[kind]
            table = getattr(state, table_name)
            holder = table.get(rest[0])
            if holder is None or getattr(holder, field_name) != old:
                return False
            table[rest[0]] = dataclasses.replace(holder, **{field_name: new})
            return True
        if kind == AUDIT_SIGNING_KEY and not rest:
            signing = state.audit_signing_key
            if signing is None or signing[0] != old:
                return False
            state.audit_signing_key = (new, signing[1])
            return True
        return False

    def _apply_RetireDomainGeneration(self, cmd: c.RetireDomainGeneration) -> DomainGeneration:
        generation = self._generation(cmd.generation, RETIRING)
        remaining = blobs_by_generation(self).get(cmd.generation, 0)  # type: ignore[arg-type]
        if remaining:
            raise Refused("ConflictException",
                          f"{remaining} blobs are still wrapped under domain-key generation "
                          f"{cmd.generation}.")
        self._set_state(generation, RETIRED, cmd.at)
        return self.domain_generations[cmd.generation]

    # -- snapshots -------------------------------------------------------------

    def generations_snapshot(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(g) for _, g in sorted(self.domain_generations.items())]

    @staticmethod
    def generations_from_snapshot(raw: dict[str, object]) -> dict[int, DomainGeneration]:
        listed = raw.get("domain_generations")
        if isinstance(listed, list):
            return {g["generation"]: DomainGeneration(**g) for g in listed}
        # Snapshots from before rotation existed: one generation, named by its check value.
        check = raw.get("domain_key_check")
        if check is None:
            return {}
        return {domain_blob.FIRST_GENERATION: DomainGeneration(
            domain_blob.FIRST_GENERATION, str(check), 0.0, ACTIVE, 0.0)}
