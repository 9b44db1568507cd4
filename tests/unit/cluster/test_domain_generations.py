"""Domain-key generations in the replicated state (cluster/domain_generations.py), driven
directly: no Raft, no HSM. Blobs are stand-ins tagged as kmsd.domain_blob tags real ones."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cluster import commands as c
from cluster import domain_generations as dg
from cluster.state import Applied, KmsState, Rejected
from kmsd import domain_blob

ACCOUNT = "111122223333"
NODES = ("n1", "n2", "n3")


def wrapped(generation: int, salt: int = 0) -> bytes:
    """A stand-in CKM_AES_KEY_WRAP_PAD blob (40 bytes) of this generation."""
    return domain_blob.tag(generation, salt.to_bytes(8, "big") + bytes(32))


def sealed(generation: int, salt: int = 0) -> bytes:
    """A stand-in sealed secret (nonce || ciphertext || tag) of this generation."""
    return domain_blob.tag(generation, b"\x01" + salt.to_bytes(11, "big") + bytes(56))


def create_key(key_id: str, blob: bytes, key_spec: str = "SYMMETRIC_DEFAULT") -> c.CreateKey:
    return c.CreateKey(key_id, "us-east-1", ACCOUNT, "", "ENCRYPT_DECRYPT", key_spec, "AWS_KMS",
                       "{}", (), blob, 1.0)


def ok(state: KmsState, cmd: c.Command) -> Any:
    result = state.apply(cmd)
    assert isinstance(result, Applied), result
    return result.value


def refused(state: KmsState, cmd: c.Command) -> Rejected:
    result = state.apply(cmd)
    assert isinstance(result, Rejected), result
    return result


def cluster() -> KmsState:
    state = KmsState()
    ok(state, c.InitCluster("kcv-1"))
    for node in NODES:
        ok(state, c.RegisterNode(node, "az", f"{node}:1", f"http://{node}", f"http://{node}a"))
    return state


def begin_and_activate(state: KmsState, generation: int = 2) -> None:
    ok(state, c.RequestDomainRotation(10.0))
    ok(state, c.BeginDomainRotation(generation, f"kcv-{generation}", 11.0))
    ok(state, c.ActivateDomainGeneration(generation, NODES, 12.0))


def rewrap_everything(state: KmsState, generation: int) -> tuple[int, int]:
    items = tuple((b.locator, b.blob, sealed(generation, i) if b.sealed else
                   wrapped(generation, i)) for i, b in enumerate(dg.stored_blobs(state))
                  if b.generation != generation)
    return ok(state, c.RewrapDomainBlobs(generation, items))


STORE = "cks-1234567890abcdef0"
SEALED_KINDS = (dg.ACCESS_KEY_SECRET, dg.CUSTOM_KEY_STORE_PASSWORD)


def store_blob(salt: int = 0) -> bytes:
    """A stand-in key-wrap blob under a custom key store's key: bare, like a domain
    generation 1 blob (the store's token labels its key as a node's token does)."""
    return salt.to_bytes(8, "big") + b"\xee" * 32


def create_store(state: KmsState, password: bytes, store_id: str = STORE) -> Any:
    return state.apply(c.CreateCustomKeyStore(store_id, "us-east-1", ACCOUNT, store_id,
                                              f"cluster-{store_id}", "anchor", password, 1.0,
                                              10))


def key_in_store(key_id: str, blob: bytes, store_id: str = STORE) -> c.CreateKey:
    return c.CreateKey(key_id, "us-east-1", ACCOUNT, "", "ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT",
                       "AWS_CLOUDHSM", "{}", (), blob, 1.0, custom_key_store_id=store_id)


def states(state: KmsState) -> dict[int, str]:
    return {n: g.state for n, g in state.domain_generations.items()}


# --- plain cases --------------------------------------------------------------------------

def test_init_cluster_names_generation_1_and_the_first_proposal_wins() -> None:
    state = KmsState()
    assert state.domain_key_check is None and state.active_generation == 1
    assert ok(state, c.InitCluster("kcv-1")) == "kcv-1"
    assert ok(state, c.InitCluster("kcv-other")) == "kcv-1"
    assert states(state) == {1: dg.ACTIVE}
    assert state.domain_key_check == "kcv-1"


def test_a_whole_rotation() -> None:
    state = cluster()
    ok(state, create_key("k1", wrapped(1, 1)))
    ok(state, create_key("k2", wrapped(1, 2), "HMAC_256"))
    ok(state, c.PutAccessKey("AKIA1", f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT, sealed(1), 1.0))
    ok(state, c.SetAuditSigningKey(wrapped(1, 3), b"public"))
    assert dg.blobs_by_generation(state) == {1: 4}

    assert ok(state, c.RequestDomainRotation(10.0)) is True
    assert ok(state, c.RequestDomainRotation(10.5)) is False  # one at a time
    assert state.domain_rotation_requested_at == 10.0
    ok(state, c.BeginDomainRotation(2, "kcv-2", 11.0))
    assert states(state) == {1: dg.ACTIVE, 2: dg.PENDING}
    assert state.domain_rotation_requested_at is None
    # Nothing is wrapped under a pending generation.
    assert state.active_generation == 1
    ok(state, c.ActivateDomainGeneration(2, NODES, 12.0))
    assert states(state) == {1: dg.RETIRING, 2: dg.ACTIVE}
    assert state.domain_key_check == "kcv-2" and state.active_generation == 2

    refused(state, c.RetireDomainGeneration(1, 13.0))  # 4 blobs still under it
    assert rewrap_everything(state, 2) == (4, 0)
    assert dg.blobs_by_generation(state) == {2: 4}
    ok(state, c.RetireDomainGeneration(1, 14.0))
    assert states(state) == {1: dg.RETIRED, 2: dg.ACTIVE}
    assert not state.rotation_in_progress
    assert state.access_keys["AKIA1"].wrapped_secret == sealed(2, 2)
    assert state.audit_signing_key == (wrapped(2, 3), b"public")


def test_key_material_id_outlives_the_rewrap() -> None:
    import hashlib

    state = cluster()
    ok(state, create_key("k1", wrapped(1, 1)))
    begin_and_activate(state)
    rewrap_everything(state, 2)
    backing = state.keys["k1"].backing_keys[0]
    assert backing.wrapped == wrapped(2, 0)
    assert backing.material_id == hashlib.sha256(wrapped(1, 1)).hexdigest()


def test_begin_needs_the_next_number_and_no_rotation_in_progress() -> None:
    state = cluster()
    assert refused(state, c.BeginDomainRotation(3, "kcv-3", 1.0)).error_type == \
        "ConflictException"
    refused(state, c.BeginDomainRotation(2, "", 1.0))
    ok(state, c.BeginDomainRotation(2, "kcv-2", 1.0))
    refused(state, c.BeginDomainRotation(3, "kcv-3", 1.0))  # 2 is pending
    ok(state, c.ActivateDomainGeneration(2, NODES, 2.0))
    refused(state, c.BeginDomainRotation(3, "kcv-3", 3.0))  # 1 is retiring
    ok(state, c.RetireDomainGeneration(1, 4.0))
    ok(state, c.BeginDomainRotation(3, "kcv-3", 5.0))


def test_a_rotation_before_init_is_refused() -> None:
    state = KmsState()
    refused(state, c.RequestDomainRotation(1.0))
    refused(state, c.BeginDomainRotation(1, "kcv", 1.0))


def test_activation_needs_every_member_including_one_that_joined_meanwhile() -> None:
    state = cluster()
    ok(state, c.BeginDomainRotation(2, "kcv-2", 1.0))
    assert "n3" in refused(state, c.ActivateDomainGeneration(2, ("n1", "n2"), 2.0)).message
    ok(state, c.RegisterNode("n4", "az", "n4:1", "http://n4", "http://n4a"))
    assert "n4" in refused(state, c.ActivateDomainGeneration(2, NODES, 2.0)).message
    ok(state, c.ActivateDomainGeneration(2, (*NODES, "n4"), 2.0))


def test_a_pending_generation_can_be_abandoned_and_its_number_is_not_reused() -> None:
    state = cluster()
    ok(state, c.BeginDomainRotation(2, "kcv-2", 1.0))
    ok(state, c.AbandonDomainGeneration(2, 2.0))
    assert states(state) == {1: dg.ACTIVE, 2: dg.ABANDONED}
    assert state.domain_rotation_requested_at == 2.0  # it starts over
    refused(state, c.ActivateDomainGeneration(2, NODES, 3.0))
    refused(state, c.BeginDomainRotation(2, "kcv-2b", 3.0))
    ok(state, c.BeginDomainRotation(3, "kcv-3", 3.0))
    refused(state, c.AbandonDomainGeneration(1, 4.0))  # only a pending one


def test_rewrap_skips_a_blob_that_changed_or_vanished_meanwhile() -> None:
    state = cluster()
    ok(state, create_key("k1", wrapped(1, 1)))
    ok(state, create_key("k2", wrapped(1, 2)))
    ok(state, c.PutAccessKey("AKIA1", "arn", ACCOUNT, sealed(1, 1), 1.0))
    begin_and_activate(state)
    items = tuple((b.locator, b.blob, wrapped(2, 9) if not b.sealed else sealed(2, 9))
                  for b in dg.stored_blobs(state))
    # Meanwhile: k1 is deleted and the access key is deleted and made again.
    ok(state, c.ScheduleKeyDeletion("k1", 5.0, 7))
    ok(state, c.DeleteKey("k1", 6.0))
    ok(state, c.DeleteAccessKey("AKIA1"))
    ok(state, c.PutAccessKey("AKIA1", "arn", ACCOUNT, sealed(2, 5), 7.0))
    assert ok(state, c.RewrapDomainBlobs(2, items)) == (1, 2)
    assert state.keys["k2"].backing_keys[0].wrapped == wrapped(2, 9)
    assert state.access_keys["AKIA1"].wrapped_secret == sealed(2, 5)


def test_rewrap_only_into_the_active_generation() -> None:
    state = cluster()
    ok(state, create_key("k1", wrapped(1, 1)))
    begin_and_activate(state)
    locator = (dg.BACKING_KEY, "k1", "1")
    refused(state, c.RewrapDomainBlobs(1, ((locator, wrapped(1, 1), wrapped(1, 2)),)))
    # A new blob of another generation than the command's is skipped.
    assert ok(state, c.RewrapDomainBlobs(2, ((locator, wrapped(1, 1), wrapped(3, 2)),))) \
        == (0, 1)
    assert ok(state, c.RewrapDomainBlobs(2, (((dg.BACKING_KEY, "k1", "x"), wrapped(1, 1),
                                               wrapped(2, 2)),))) == (0, 1)


def test_new_blobs_under_a_retired_or_pending_generation_are_refused() -> None:
    state = cluster()
    ok(state, c.BeginDomainRotation(2, "kcv-2", 1.0))
    assert refused(state, create_key("p", wrapped(2))).error_type == "KMSInternalException"
    ok(state, c.ActivateDomainGeneration(2, NODES, 2.0))
    ok(state, create_key("old", wrapped(1)))  # retiring still unwraps: accepted
    ok(state, create_key("new", wrapped(2)))
    rewrap_everything(state, 2)
    ok(state, c.RetireDomainGeneration(1, 3.0))
    refused(state, create_key("late", wrapped(1)))
    refused(state, c.PutAccessKey("AKIA2", "arn", ACCOUNT, sealed(1), 4.0))
    refused(state, c.RotateKey("new", wrapped(1, 7), "ON_DEMAND", 1, 10, 5.0))
    ok(state, c.RotateKey("new", wrapped(2, 7), "ON_DEMAND", 1, 10, 5.0))
    assert dg.blobs_by_generation(state) == {2: 3}


def test_snapshots_keep_generations_and_old_snapshots_get_generation_1() -> None:
    state = cluster()
    begin_and_activate(state)
    assert ok(state, c.RequestDomainRotation(20.0)) is False  # generation 1 is retiring
    ok(state, c.RetireDomainGeneration(1, 20.0))
    assert ok(state, c.RequestDomainRotation(20.0)) is True
    copy = KmsState()
    copy.restore_snapshot(state.to_snapshot())
    assert copy.domain_generations == state.domain_generations
    assert copy.domain_rotation_requested_at == 20.0
    assert copy.fingerprint() == state.fingerprint()

    import msgpack

    raw = msgpack.unpackb(cluster().to_snapshot(), raw=False)
    del raw["domain_generations"], raw["domain_rotation_requested_at"]
    old = KmsState()
    old.restore_snapshot(msgpack.packb(raw, use_bin_type=True))
    assert states(old) == {1: dg.ACTIVE} and old.domain_key_check == "kcv-1"


def test_restoring_a_snapshot_needs_its_generations_live_here() -> None:
    source = cluster()
    ok(source, create_key("k1", wrapped(1, 1)))
    snapshot = source.to_snapshot()

    target = cluster()
    ok(target, c.RestoreSnapshot(snapshot))

    rotated = cluster()
    begin_and_activate(rotated)
    ok(rotated, c.RetireDomainGeneration(1, 20.0))
    assert "generation 1" in refused(rotated, c.RestoreSnapshot(snapshot)).message


# --- any interleaving ----------------------------------------------------------------------

KEY_POOL = ("k1", "k2", "k3", "k4")
ACCESS_POOL = ("AKIA1", "AKIA2")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_interleaving_leaves_every_blob_under_a_live_generation(data: st.DataObject) -> None:
    state = cluster()
    members = list(NODES)
    salt = 0
    for _ in range(data.draw(st.integers(5, 60))):
        salt += 1
        top = max(state.domain_generations)
        any_generation = st.integers(1, top + 1)
        # Mostly the generation a command would name in a real rotation, sometimes any.
        pending = [g.generation for g in state.generations_in(dg.PENDING)]
        retiring = [g.generation for g in state.generations_in(dg.RETIRING)]
        likely_pending = st.sampled_from(pending) if pending else any_generation
        likely_retiring = st.sampled_from(retiring) if retiring else any_generation
        op = data.draw(st.sampled_from((
            "create", "rotate_key", "delete_key", "put_access", "delete_access", "join",
            "store", "store_password", "store_key",
            "request", "begin", "abandon", "activate", "rewrap", "rewrap_stale", "rewrap_all",
            "retire")))
        before = {b.locator: b.blob for b in dg.stored_blobs(state)}
        if op == "create":
            cmd: c.Command = create_key(data.draw(st.sampled_from(KEY_POOL)),
                                        wrapped(data.draw(any_generation), salt))
        elif op == "rotate_key" and state.keys:
            key_id = data.draw(st.sampled_from(sorted(state.keys)))
            cmd = c.RotateKey(key_id, wrapped(data.draw(any_generation), salt), "ON_DEMAND",
                              state.keys[key_id].current_backing_key.version, 100, 2.0)
        elif op == "delete_key" and state.keys:
            key_id = data.draw(st.sampled_from(sorted(state.keys)))
            state.apply(c.ScheduleKeyDeletion(key_id, 1.0, 7))
            cmd = c.DeleteKey(key_id, 2.0)
        elif op == "put_access":
            cmd = c.PutAccessKey(data.draw(st.sampled_from(ACCESS_POOL)), "arn", ACCOUNT,
                                 sealed(data.draw(any_generation), salt), 1.0)
        elif op == "delete_access":
            cmd = c.DeleteAccessKey(data.draw(st.sampled_from(ACCESS_POOL)))
        elif op == "store":
            cmd = c.CreateCustomKeyStore(STORE, "us-east-1", ACCOUNT, "s", "cluster-s", "a",
                                         sealed(data.draw(any_generation), salt), 1.0, 10)
        elif op == "store_password":
            # Only a disconnected store's password changes.
            state.apply(c.SetCustomKeyStoreConnection(STORE, "DISCONNECTED"))
            cmd = c.UpdateCustomKeyStore(STORE, None, None,
                                         sealed(data.draw(any_generation), salt))
        elif op == "store_key":
            state.apply(c.SetCustomKeyStoreConnection(STORE, "CONNECTED", key_check="s"))
            cmd = key_in_store(data.draw(st.sampled_from(KEY_POOL)), store_blob(salt))
        elif op == "join":
            members.append(f"n{len(members) + 1}")
            cmd = c.RegisterNode(members[-1], "az", "a:1", "u", "a")
        elif op == "request":
            cmd = c.RequestDomainRotation(3.0)
        elif op == "begin":
            number = data.draw(st.just(top + 1) | st.integers(top, top + 2))
            cmd = c.BeginDomainRotation(number, f"kcv-{number}", 4.0)
        elif op == "abandon":
            cmd = c.AbandonDomainGeneration(data.draw(likely_pending | any_generation), 5.0)
        elif op == "activate":
            confirmed = data.draw(st.lists(st.sampled_from(members), unique=True))
            if data.draw(st.integers(0, 3)):
                confirmed = list(members)
            cmd = c.ActivateDomainGeneration(data.draw(likely_pending | any_generation),
                                             tuple(confirmed), 6.0)
        elif op in ("rewrap", "rewrap_stale") and before:
            old_ones = sorted(k for k, v in before.items()
                              if dg.blob_generation(k[0], v) != state.active_generation)
            chosen = data.draw(st.lists(st.sampled_from(old_ones or sorted(before)),
                                        unique=True, max_size=6))
            target = state.active_generation if data.draw(st.booleans()) else \
                data.draw(any_generation)
            items = []
            for locator in chosen:
                old = before[locator] if op == "rewrap" else wrapped(1, 10**6 + salt)
                new = (sealed if locator[0] in SEALED_KINDS else wrapped)(target, salt)
                items.append((locator, old, new))
            cmd = c.RewrapDomainBlobs(data.draw(st.sampled_from(
                (state.active_generation, target))), tuple(items))
        elif op == "rewrap_all":
            active = state.active_generation
            cmd = c.RewrapDomainBlobs(active, tuple(
                (b.locator, b.blob, (sealed if b.sealed else wrapped)(active, salt))
                for b in dg.stored_blobs(state) if b.generation != active))
        elif op == "retire":
            cmd = c.RetireDomainGeneration(data.draw(likely_retiring | any_generation), 7.0)
        else:
            continue
        result = state.apply(cmd)
        event(f"{op}: {'applied' if isinstance(result, Applied) else 'refused'}")
        check_invariants(state)
        if isinstance(cmd, c.RewrapDomainBlobs) and isinstance(result, Applied):
            after = {b.locator: b.blob for b in dg.stored_blobs(state)}
            for locator, old, new in cmd.items:
                if before.get(locator) == old and locator in after and \
                        dg.blob_generation(locator[0], new) == cmd.generation and \
                        dg.blob_generation(locator[0], old) != cmd.generation:
                    assert after[locator] == new
                else:
                    assert after.get(locator) == before.get(locator)


def check_invariants(state: KmsState) -> None:
    by_state: dict[str, list[int]] = {}
    for number, generation in state.domain_generations.items():
        by_state.setdefault(generation.state, []).append(number)
    assert sorted(state.domain_generations) == list(range(1, len(state.domain_generations) + 1))
    assert len(by_state.get(dg.ACTIVE, [])) == 1
    assert len(by_state.get(dg.PENDING, [])) + len(by_state.get(dg.RETIRING, [])) <= 1
    live = set(by_state.get(dg.ACTIVE, [])) | set(by_state.get(dg.RETIRING, []))
    # Every blob unwraps under a generation every token still holds, and under no other.
    for stored in dg.stored_blobs(state):
        assert stored.generation in live, (stored.locator, stored.generation, by_state)
    # A custom key store's keys are under its store key: never listed, never re-wrapped.
    listed = {b.locator for b in dg.stored_blobs(state)}
    for key_id, record in list(state.keys.items()):
        if record.custom_key_store_id is not None:
            assert not any(locator[:2] == (dg.BACKING_KEY, key_id) for locator in listed)
            assert all(b.wrapped.endswith(b"\xee" * 32) for b in record.backing_keys)
    if by_state.get(dg.RETIRING):
        assert max(live) == by_state[dg.ACTIVE][0]


def test_a_store_keys_blob_is_no_domain_blob_and_a_store_password_is() -> None:
    state = cluster()
    ok(state, create_key("k1", wrapped(1, 1)))
    assert isinstance(create_store(state, sealed(1, 1)), Applied)
    ok(state, c.SetCustomKeyStoreConnection(STORE, "CONNECTED", key_check="s"))
    ok(state, key_in_store("in-store", store_blob(1)))
    listed = {b.locator: b for b in dg.stored_blobs(state)}
    assert (dg.BACKING_KEY, "in-store", "1") not in listed
    password = listed[(dg.CUSTOM_KEY_STORE_PASSWORD, STORE)]
    assert password.sealed and password.generation == 1 and password.blob == sealed(1, 1)
    assert dg.blobs_by_generation(state) == {1: 2}

    begin_and_activate(state)
    # A rewrap naming the store key's backing key changes nothing: no domain key wraps it.
    assert ok(state, c.RewrapDomainBlobs(2, (((dg.BACKING_KEY, "in-store", "1"),
                                              store_blob(1), wrapped(2, 5)),))) == (0, 1)
    # A stale old password (changed meanwhile) is skipped, the current one re-sealed --
    # while the store is connected, where UpdateCustomKeyStore could not change it.
    locator = (dg.CUSTOM_KEY_STORE_PASSWORD, STORE)
    assert ok(state, c.RewrapDomainBlobs(2, ((locator, sealed(1, 9), sealed(2, 9)),))) \
        == (0, 1)
    assert rewrap_everything(state, 2) == (2, 0)
    assert state.custom_key_stores[STORE].sealed_password != sealed(1, 1)
    assert domain_blob.seal_generation(state.custom_key_stores[STORE].sealed_password) == 2
    assert state.custom_key_stores[STORE].connection_state == "CONNECTED"
    # The store key does not hold generation 1 back.
    ok(state, c.RetireDomainGeneration(1, 20.0))
    assert state.keys["in-store"].backing_keys[0].wrapped == store_blob(1)

    # New store keys are bare store-key blobs, whatever generation is retired.
    ok(state, key_in_store("in-store-2", store_blob(2)))
    assert dg.blobs_by_generation(state) == {2: 2}
    # Nor can a domain-wrapped version join a store key's store-wrapped ones.
    assert refused(state, c.RotateKey("in-store-2", wrapped(2, 6), "ON_DEMAND", 1, 10, 21.0)
                   ).error_type == "UnsupportedOperationException"
    # A password sealed under a retired generation is refused, at creation and update.
    assert create_store(state, sealed(1, 3), "cks-2").error_type == "KMSInternalException"
    ok(state, c.SetCustomKeyStoreConnection(STORE, "DISCONNECTED"))
    refused(state, c.UpdateCustomKeyStore(STORE, None, None, sealed(1, 4)))
    ok(state, c.UpdateCustomKeyStore(STORE, None, None, sealed(2, 4)))
    ok(state, c.UpdateCustomKeyStore(STORE, "renamed", None, None))


@pytest.mark.parametrize("blob", [os.urandom(40), wrapped(5)])
def test_stored_blob_generation_reads_the_tag(blob: bytes) -> None:
    state = cluster()
    state.apply(create_key("k1", blob))
    stored = list(dg.stored_blobs(state))
    assert [b.generation for b in stored] == ([1] if len(blob) == 40 and
                                              not blob.startswith(domain_blob.MAGIC) else [])
