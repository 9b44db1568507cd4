"""Tests for cluster.state: the pure, deterministic apply of the replicated log.

Driven directly, with no Raft and no sockets: random command sequences (drawn from small pools
of ids, regions, alias names and tag keys so that collisions, races and references to missing
keys happen) are applied to fresh replicas and the resulting snapshots compared.
"""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import commands as c
from cluster.state import (
    KEY_STATE_DISABLED,
    KEY_STATE_ENABLED,
    KEY_STATE_PENDING_DELETION,
    ROTATION_AUTOMATIC,
    ROTATION_ON_DEMAND,
    SECONDS_PER_DAY,
    AliasRecord,
    Applied,
    KeyRecord,
    KmsState,
    Rejected,
    alias_arn,
    key_arn,
)

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
REGIONS = ("us-east-1", "eu-west-1")
REGION, OTHER_REGION = REGIONS
KEY_IDS = ("1234abcd-12ab-34cd-56ef-1234567890ab", "0987dcba-09fe-87dc-65ba-ab0987654321",
           "11111111-2222-4333-8444-555555555555")
KEY, KEY2 = KEY_IDS[0], KEY_IDS[1]
PENDING_KEY_ID = "99999999-9999-4999-8999-999999999999"
ALIASES = ("alias/a", "alias/b", "alias/Prod")
TAG_KEYS = ("team", "env", "Env")
TIMES = st.floats(min_value=0, max_value=2e9, allow_nan=False)

key_ids = st.sampled_from((*KEY_IDS, PENDING_KEY_ID))  # ids of missing keys are drawn too
regions = st.sampled_from(REGIONS)
aliases = st.sampled_from(ALIASES)
short_text = st.text(max_size=6)
tags = st.lists(st.tuples(st.sampled_from(TAG_KEYS), short_text), max_size=3).map(tuple)

create_key = st.builds(
    c.CreateKey, key_id=key_ids, region=regions,
    account_id=st.sampled_from((ACCOUNT, OTHER_ACCOUNT)), description=short_text,
    key_usage=st.just("ENCRYPT_DECRYPT"), key_spec=st.just("SYMMETRIC_DEFAULT"),
    origin=st.just("AWS_KMS"), policy=short_text, tags=tags,
    wrapped_backing_key=st.binary(max_size=8), at=TIMES)
put_access_key = st.builds(
    c.PutAccessKey, access_key_id=st.sampled_from(("AKIA1", "AKIA2")),
    principal_arn=st.sampled_from((f"arn:aws:iam::{ACCOUNT}:user/u", "arn:aws:iam::1:root")),
    account_id=st.sampled_from((ACCOUNT, OTHER_ACCOUNT)), wrapped_secret=st.binary(max_size=8),
    at=TIMES)
register_node = st.builds(c.RegisterNode, node_id=st.sampled_from(("n1", "n2", "n3")),
                          az=st.sampled_from(("az1", "az2")), raft_address=short_text,
                          api_url=short_text, admin_url=short_text)
init_cluster = st.builds(c.InitCluster, domain_key_check=st.sampled_from(("kcv-1", "kcv-2", "")))


@st.composite
def sequences(draw: st.DrawFn, min_size: int = 5, max_size: int = 40) -> list[c.Command]:
    """A few CreateKeys, then any commands.

    Commands naming a key mostly pick (id, region) of a key created up front, so that aliases
    find their targets and collide often; otherwise any id (maybe missing) in any region.
    """
    cmds: list[c.Command] = draw(st.lists(create_key, min_size=1, max_size=4))
    targets = (st.sampled_from([(cmd.key_id, cmd.region) for cmd in cmds])
               | st.tuples(key_ids, regions))
    ids = targets.map(lambda target: target[0])

    def alias_change(kind: type[c.CreateAlias | c.UpdateAlias]) -> st.SearchStrategy:
        return st.builds(lambda target, name, at: kind(target[1], name, target[0], at),
                         targets, aliases, TIMES)

    command = st.one_of(
        alias_change(c.CreateAlias), alias_change(c.UpdateAlias),
        st.builds(c.SetKeyEnabled, ids, st.booleans(), TIMES),
        st.builds(lambda target, name: c.DeleteAlias(target[1], name), targets, aliases),
        st.builds(c.ScheduleKeyDeletion, ids, TIMES, st.integers(7, 30)),
        st.builds(c.CancelKeyDeletion, ids),
        st.builds(c.DeleteKey, ids, TIMES),
        st.builds(c.TagKey, ids, tags, st.integers(0, 4)),
        st.builds(c.UntagKey, ids, st.lists(st.sampled_from(TAG_KEYS), max_size=2).map(tuple)),
        st.builds(c.UpdateKeyDescription, ids, short_text),
        st.builds(c.SetKeyRotation, ids, st.booleans(), st.integers(90, 2560), TIMES),
        st.builds(c.RotateKey, ids, st.binary(max_size=4),
                  st.sampled_from((ROTATION_AUTOMATIC, ROTATION_ON_DEMAND)), st.integers(1, 4),
                  st.integers(0, 3), TIMES),
        create_key, put_access_key, register_node, init_cluster, st.just(c.Barrier()))
    return cmds + draw(st.lists(command, min_size=min_size, max_size=max_size))


SETTINGS = settings(max_examples=40, deadline=None)


# --- helpers ----------------------------------------------------------------------------------

def create_key_cmd(key_id: str, region: str = REGION, at: float = 1.0) -> c.CreateKey:
    return c.CreateKey(key_id=key_id, region=region, account_id=ACCOUNT, description="",
                       key_usage="ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT",
                       origin="AWS_KMS", policy="{}", tags=(("team", "kms"),),
                       wrapped_backing_key=b"wrapped", at=at)


def build(*cmds: c.Command) -> KmsState:
    state = KmsState()
    for cmd in cmds:
        assert isinstance(state.apply(cmd), Applied), cmd
    return state


def state_with_pending_key() -> KmsState:
    """A state holding PENDING_KEY_ID in PendingDeletion (deletion date 1000)."""
    return build(create_key_cmd(PENDING_KEY_ID), c.ScheduleKeyDeletion(PENDING_KEY_ID, 1000.0, 7))


def fresh(seed_pending: bool) -> KmsState:
    return state_with_pending_key() if seed_pending else KmsState()


def apply_all(state: KmsState, cmds: Sequence[c.Command]) -> list[Any]:
    return [state.apply(cmd) for cmd in cmds]


def snapshot_without_count(state: KmsState) -> dict[str, Any]:
    raw = msgpack.unpackb(state.to_snapshot(), raw=False)
    del raw["applied_count"]
    return raw


def check_invariants(state: KmsState) -> None:
    for (region, name), alias in state.aliases.items():
        assert (alias.region, alias.alias_name) == (region, name)
        target = state.keys.get(alias.target_key_id)
        assert target is not None, alias
        assert target.region == region, alias
    for key_id, record in state.keys.items():
        assert record.key_id == key_id
        assert record.epoch >= 1
        assert record.key_state in {KEY_STATE_ENABLED, KEY_STATE_DISABLED,
                                    KEY_STATE_PENDING_DELETION}
        pending = record.key_state == KEY_STATE_PENDING_DELETION
        assert pending == (record.deletion_date is not None)
        assert pending == (record.pending_window_days is not None)
        assert [b.version for b in record.backing_keys] == list(
            range(1, len(record.backing_keys) + 1))
        assert record.backing_keys[0].rotation_type is None
        assert all(b.rotation_type in {ROTATION_AUTOMATIC, ROTATION_ON_DEMAND}
                   for b in record.backing_keys[1:])
        if record.rotation_enabled:
            assert record.next_rotation_at is not None
            assert record.rotation_period_days is not None
    for access_key_id, access_key in state.access_keys.items():
        assert access_key.access_key_id == access_key_id
    for node_id, node in state.nodes.items():
        assert node.node_id == node_id


# --- replicas agree -------------------------------------------------------------------------

@SETTINGS
@given(cmds=sequences(), seed_pending=st.booleans())
def test_two_replicas_agree(cmds: list[c.Command], seed_pending: bool) -> None:
    a, b = fresh(seed_pending), fresh(seed_pending)
    assert apply_all(a, cmds) == apply_all(b, cmds)
    assert a.to_snapshot() == b.to_snapshot()
    assert a.fingerprint() == b.fingerprint() == a.to_snapshot()


@SETTINGS
@given(cmds=sequences(), seed_pending=st.booleans())
def test_applying_through_the_wire_encoding_is_the_same(cmds: list[c.Command],
                                                        seed_pending: bool) -> None:
    direct, via_wire = fresh(seed_pending), fresh(seed_pending)
    direct_results = apply_all(direct, cmds)
    wire_results = [via_wire.apply(c.decode(c.encode(cmd))) for cmd in cmds]
    assert direct_results == wire_results
    assert direct.to_snapshot() == via_wire.to_snapshot()


@SETTINGS
@given(before=sequences(), after=sequences(), seed_pending=st.booleans())
def test_snapshot_captures_everything(before: list[c.Command], after: list[c.Command],
                                      seed_pending: bool) -> None:
    original = fresh(seed_pending)
    apply_all(original, before)
    restored = KmsState()
    restored.restore_snapshot(original.to_snapshot())
    assert restored.to_snapshot() == original.to_snapshot()
    assert restored.keys == original.keys
    assert restored.aliases == original.aliases
    assert restored.access_keys == original.access_keys
    assert restored.nodes == original.nodes
    assert restored.domain_key_check == original.domain_key_check
    assert restored.applied_count == original.applied_count
    assert apply_all(restored, after) == apply_all(original, after)
    assert restored.to_snapshot() == original.to_snapshot()


@settings(max_examples=20, deadline=None)
@given(before=sequences(), after=sequences())
def test_restore_replaces_previous_contents(before: list[c.Command],
                                           after: list[c.Command]) -> None:
    source, target = KmsState(), KmsState()
    apply_all(source, before)
    apply_all(target, after)
    target.restore_snapshot(source.to_snapshot())
    assert target.to_snapshot() == source.to_snapshot()


def test_snapshot_bytes_do_not_depend_on_insertion_order() -> None:
    # "Sorted, so that replicas holding the same state give the same bytes."
    alias_a, alias_b = (c.CreateAlias(REGION, name, KEY, 1.0) for name in ("alias/a", "alias/b"))
    a = build(create_key_cmd(KEY), create_key_cmd(KEY2), alias_b, alias_a)
    b = build(create_key_cmd(KEY2), create_key_cmd(KEY), alias_a, alias_b)
    assert a.to_snapshot() == b.to_snapshot()


def test_restore_of_a_snapshot_without_newer_fields() -> None:
    # A snapshot written before deletion and rotation existed restores with their defaults.
    raw = msgpack.unpackb(build(create_key_cmd(KEY)).to_snapshot(), raw=False)
    (record,) = raw["keys"]
    for name in ("deletion_date", "pending_window_days", "rotation_enabled",
                 "rotation_period_days", "next_rotation_at"):
        del record[name]
    del record["backing_keys"][0]["rotation_type"]
    state = KmsState()
    state.restore_snapshot(msgpack.packb(raw, use_bin_type=True))
    assert state.keys[KEY] == build(create_key_cmd(KEY)).keys[KEY]


# --- invariants -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(cmds=sequences(), seed_pending=st.booleans())
def test_invariants_hold_after_every_command(cmds: list[c.Command], seed_pending: bool) -> None:
    state = fresh(seed_pending)
    first_check = None
    count = state.applied_count
    for cmd in cmds:
        snapshot_before = snapshot_without_count(state)
        keys_before = dict(state.keys)

        result = state.apply(cmd)

        assert isinstance(result, Applied | Rejected)
        # applied_count counts every entry applied, refused ones included.
        count += 1
        assert state.applied_count == count
        if isinstance(result, Rejected) or (
                isinstance(cmd, c.RotateKey | c.DeleteKey) and result == Applied(None)):
            # Refused, a lost automatic-rotation race, or a deletion not yet due: no change.
            assert snapshot_without_count(state) == snapshot_before, result
        check_invariants(state)

        # The epoch moves by exactly one when, and only when, the key state changes (for the
        # commands generated here; policy and grant changes bump it too, by design).
        for key_id, record in state.keys.items():
            old = keys_before.get(key_id)
            if old is None:
                assert isinstance(cmd, c.CreateKey) and cmd.key_id == key_id
                assert (record.epoch, record.key_state) == (1, KEY_STATE_ENABLED)
            elif record.key_state != old.key_state:
                assert record.epoch == old.epoch + 1
            else:
                assert record.epoch == old.epoch

        # Only a due DeleteKey removes a key, and with it the aliases that refer to it.
        removed = set(keys_before) - set(state.keys)
        if removed:
            assert isinstance(cmd, c.DeleteKey) and removed == {cmd.key_id}
            old = keys_before[cmd.key_id]
            assert old.key_state == KEY_STATE_PENDING_DELETION
            assert old.deletion_date is not None and old.deletion_date <= cmd.at
            assert result == Applied(old)
            assert all(a.target_key_id != cmd.key_id for a in state.aliases.values())

        if isinstance(cmd, c.InitCluster):
            first_check = cmd.domain_key_check if first_check is None else first_check
            assert result == Applied(first_check)
        assert state.domain_key_check == first_check


@settings(max_examples=60, deadline=None)
@given(cmds=sequences(), seed_pending=st.booleans())
def test_refused_commands_are_exactly_the_invalid_ones(cmds: list[c.Command],
                                                       seed_pending: bool) -> None:
    # A model of which commands are refused, written independently of the state machine's code.
    state = fresh(seed_pending)
    for cmd in cmds:
        expected = _expected_refusal(dict(state.keys), dict(state.aliases), cmd)
        result = state.apply(cmd)
        assert (result.error_type if isinstance(result, Rejected) else None) == expected, cmd


def _expected_refusal(keys: dict[str, KeyRecord], aliases: dict[tuple[str, str], AliasRecord],
                      cmd: c.Command) -> str | None:
    def state_of(key_id: str) -> str | None:
        return keys[key_id].key_state if key_id in keys else None

    if isinstance(cmd, c.CreateKey):
        return "AlreadyExistsException" if cmd.key_id in keys else None
    if isinstance(cmd, c.CreateAlias | c.UpdateAlias):
        target_state = state_of(cmd.target_key_id)
        if target_state is None:
            return "NotFoundException"
        exists = (cmd.region, cmd.alias_name) in aliases
        if isinstance(cmd, c.CreateAlias) and exists:
            return "AlreadyExistsException"
        if isinstance(cmd, c.UpdateAlias) and not exists:
            return "NotFoundException"
        if keys[cmd.target_key_id].region != cmd.region:
            return "NotFoundException"
        return "KMSInvalidStateException" if target_state == KEY_STATE_PENDING_DELETION else None
    if isinstance(cmd, c.DeleteAlias):
        return None if (cmd.region, cmd.alias_name) in aliases else "NotFoundException"
    if isinstance(cmd, c.DeleteKey):
        return None  # not due, or already gone: nothing to do
    if isinstance(cmd, c.SetKeyEnabled | c.UpdateKeyDescription | c.TagKey | c.UntagKey
                  | c.ScheduleKeyDeletion | c.CancelKeyDeletion | c.SetKeyRotation | c.RotateKey):
        key_state = state_of(cmd.key_id)
        if key_state is None:
            return "NotFoundException"
        if isinstance(cmd, c.CancelKeyDeletion):
            return None if key_state == KEY_STATE_PENDING_DELETION else "KMSInvalidStateException"
        if key_state == KEY_STATE_PENDING_DELETION:
            return "KMSInvalidStateException"
        record = keys[cmd.key_id]
        if isinstance(cmd, c.TagKey):
            return "LimitExceededException" if len(
                {k for k, _ in record.tags} | {k for k, _ in cmd.tags}) > cmd.max_tags else None
        if isinstance(cmd, c.SetKeyRotation | c.RotateKey) and key_state == KEY_STATE_DISABLED:
            return "DisabledException"
        if isinstance(cmd, c.RotateKey) and cmd.rotation_type == ROTATION_ON_DEMAND:
            if record.current_backing_key.version != cmd.expected_version:
                return "ConflictException"
            done = sum(b.rotation_type == ROTATION_ON_DEMAND for b in record.backing_keys)
            return "LimitExceededException" if done >= cmd.max_on_demand else None
        return None
    return None  # Barrier, InitCluster, RegisterNode, PutAccessKey are never refused


# --- plain cases: keys ------------------------------------------------------------------------

def test_fresh_state() -> None:
    state = KmsState()
    assert (state.keys, state.aliases, state.access_keys, state.nodes) == ({}, {}, {}, {})
    assert state.domain_key_check is None
    assert state.applied_count == 0


def test_create_key_returns_the_enabled_record() -> None:
    state = KmsState()
    result = state.apply(create_key_cmd(KEY, at=42.5))
    assert isinstance(result, Applied)
    record = result.value
    assert isinstance(record, KeyRecord)
    assert record == state.keys[KEY]
    assert (record.key_state, record.epoch, record.created_at) == (KEY_STATE_ENABLED, 1, 42.5)
    assert record.arn == key_arn(REGION, ACCOUNT, KEY)
    assert record.arn == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY}"
    assert record.current_backing_key.version == 1
    assert record.backing_key(1) == record.current_backing_key
    assert record.backing_key(2) is None
    assert record.current_backing_key.wrapped == b"wrapped"
    assert (record.deletion_date, record.rotation_enabled) == (None, False)


def test_duplicate_key_id_is_refused_even_in_another_region() -> None:
    # AlreadyExistsException: "it attempted to create a resource that already exists."
    state = build(create_key_cmd(KEY))
    assert state.apply(create_key_cmd(KEY, OTHER_REGION)) == Rejected(
        "AlreadyExistsException", f"Key '{KEY}' already exists")


@pytest.mark.parametrize("cmd", [
    c.SetKeyEnabled(KEY, False, 1.0), c.UpdateKeyDescription(KEY, "d"),
    c.TagKey(KEY, (("a", "b"),), 50), c.UntagKey(KEY, ("a",)), c.ScheduleKeyDeletion(KEY, 1.0, 7),
    c.CancelKeyDeletion(KEY), c.SetKeyRotation(KEY, True, 365, 1.0),
    c.RotateKey(KEY, b"w", ROTATION_ON_DEMAND, 1, 25, 1.0),
    c.RotateKey(KEY, b"w", ROTATION_AUTOMATIC, 1, 25, 1.0),
], ids=lambda cmd: cmd.op)
def test_commands_on_a_missing_key(cmd: c.Command) -> None:
    # NotFoundException: "the specified entity or resource could not be found."
    state = KmsState()
    assert state.apply(cmd) == Rejected("NotFoundException", f"Key '{KEY}' does not exist")
    assert state.keys == {}


def test_set_key_enabled_toggles_state_and_epoch() -> None:
    state = build(create_key_cmd(KEY))
    disabled = state.apply(c.SetKeyEnabled(KEY, False, 2.0))
    assert isinstance(disabled, Applied)
    assert (disabled.value.key_state, disabled.value.epoch) == (KEY_STATE_DISABLED, 2)
    again = state.apply(c.SetKeyEnabled(KEY, False, 3.0))
    assert isinstance(again, Applied)
    assert (again.value.key_state, again.value.epoch) == (KEY_STATE_DISABLED, 2)
    enabled = state.apply(c.SetKeyEnabled(KEY, True, 4.0))
    assert isinstance(enabled, Applied)
    assert (enabled.value.key_state, enabled.value.epoch) == (KEY_STATE_ENABLED, 3)


@pytest.mark.parametrize("cmd", [
    c.SetKeyEnabled(PENDING_KEY_ID, True, 1.0), c.SetKeyEnabled(PENDING_KEY_ID, False, 1.0),
    c.UpdateKeyDescription(PENDING_KEY_ID, "d"), c.TagKey(PENDING_KEY_ID, (), 50),
    c.UntagKey(PENDING_KEY_ID, ()), c.ScheduleKeyDeletion(PENDING_KEY_ID, 5.0, 30),
    c.SetKeyRotation(PENDING_KEY_ID, False, 365, 1.0),
    c.RotateKey(PENDING_KEY_ID, b"w", ROTATION_ON_DEMAND, 1, 25, 1.0),
    c.CreateAlias(REGION, "alias/b", PENDING_KEY_ID, 1.0),
    c.UpdateAlias(REGION, "alias/a", PENDING_KEY_ID, 1.0),
], ids=lambda cmd: cmd.op)
def test_pending_deletion_key_refuses_changes(cmd: c.Command) -> None:
    # KMSInvalidStateException: "The key state of the KMS key is not compatible with the
    # operation."
    state = state_with_pending_key()
    for setup in (create_key_cmd(KEY), c.CreateAlias(REGION, "alias/a", KEY, 1.0)):
        assert isinstance(state.apply(setup), Applied)
    before = snapshot_without_count(state)
    assert state.apply(cmd) == Rejected(
        "KMSInvalidStateException",
        f"{key_arn(REGION, ACCOUNT, PENDING_KEY_ID)} is pending deletion.")
    assert snapshot_without_count(state) == before


def test_schedule_and_cancel_key_deletion() -> None:
    # ScheduleKeyDeletion: "the key state of the KMS key changes to PendingDeletion".
    # CancelKeyDeletion: "When this operation succeeds, the key state of the KMS key is
    # Disabled."
    state = build(create_key_cmd(KEY))
    scheduled = state.apply(c.ScheduleKeyDeletion(KEY, 700.0, 7))
    assert isinstance(scheduled, Applied)
    assert (scheduled.value.key_state, scheduled.value.deletion_date,
            scheduled.value.pending_window_days, scheduled.value.epoch) == (
        KEY_STATE_PENDING_DELETION, 700.0, 7, 2)
    cancelled = state.apply(c.CancelKeyDeletion(KEY))
    assert isinstance(cancelled, Applied)
    assert (cancelled.value.key_state, cancelled.value.deletion_date,
            cancelled.value.pending_window_days, cancelled.value.epoch) == (
        KEY_STATE_DISABLED, None, None, 3)
    assert state.apply(c.CancelKeyDeletion(KEY)) == Rejected(
        "KMSInvalidStateException", f"{key_arn(REGION, ACCOUNT, KEY)} is not pending deletion.")


def test_delete_key_only_when_due_and_with_its_aliases() -> None:
    # ScheduleKeyDeletion: "After the waiting period ends, KMS deletes the KMS key, its key
    # material, and all KMS data associated with it, including all aliases that refer to it."
    state = build(create_key_cmd(KEY), create_key_cmd(KEY2),
                  c.CreateAlias(REGION, "alias/a", KEY, 1.0),
                  c.CreateAlias(REGION, "alias/b", KEY2, 1.0),
                  c.ScheduleKeyDeletion(KEY, 1000.0, 7))
    before = snapshot_without_count(state)
    assert state.apply(c.DeleteKey(KEY, 999.0)) == Applied(None)  # not due yet
    assert state.apply(c.DeleteKey(KEY2, 5000.0)) == Applied(None)  # not pending deletion
    assert state.apply(c.DeleteKey(KEY_IDS[2], 5000.0)) == Applied(None)  # no such key
    assert snapshot_without_count(state) == before
    record = state.keys[KEY]
    assert state.apply(c.DeleteKey(KEY, 1000.0)) == Applied(record)
    assert KEY not in state.keys
    assert set(state.aliases) == {(REGION, "alias/b")}
    assert state.apply(c.DeleteKey(KEY, 2000.0)) == Applied(None)  # a second proposal


def test_tags_are_merged_sorted_and_limited() -> None:
    # The tag limit is decided by the proposer and carried in the command.
    state = build(create_key_cmd(KEY))
    tagged = state.apply(c.TagKey(KEY, (("env", "prod"), ("team", "other")), 3))
    assert isinstance(tagged, Applied)
    assert tagged.value.tags == (("env", "prod"), ("team", "other"))
    assert tagged.value.epoch == 1
    before = snapshot_without_count(state)
    assert state.apply(c.TagKey(KEY, (("a", "1"), ("b", "2")), 3)) == Rejected(
        "LimitExceededException", "A KMS key can have at most 3 tags.")
    assert snapshot_without_count(state) == before
    untagged = state.apply(c.UntagKey(KEY, ("team", "missing")))
    assert isinstance(untagged, Applied)
    assert untagged.value.tags == (("env", "prod"),)


def test_update_key_description() -> None:
    state = build(create_key_cmd(KEY))
    assert state.apply(c.UpdateKeyDescription(KEY, "new")) == Applied(state.keys[KEY])
    assert (state.keys[KEY].description, state.keys[KEY].epoch) == ("new", 1)


def test_rotation_schedule() -> None:
    state = build(create_key_cmd(KEY))
    enabled = state.apply(c.SetKeyRotation(KEY, True, 365, 100.0))
    assert isinstance(enabled, Applied)
    assert enabled.value.next_rotation_at == 100.0 + 365 * SECONDS_PER_DAY
    rotated = state.apply(c.RotateKey(KEY, b"w2", ROTATION_AUTOMATIC, 1, 25, 500.0))
    assert isinstance(rotated, Applied)
    assert rotated.value.current_backing_key.version == 2
    assert rotated.value.current_backing_key.rotation_type == ROTATION_AUTOMATIC
    assert rotated.value.next_rotation_at == 500.0 + 365 * SECONDS_PER_DAY
    # RotateKeyOnDemand: "On-demand rotations do not change existing automatic rotation
    # schedules."
    on_demand = state.apply(c.RotateKey(KEY, b"w3", ROTATION_ON_DEMAND, 2, 25, 600.0))
    assert isinstance(on_demand, Applied)
    assert on_demand.value.next_rotation_at == 500.0 + 365 * SECONDS_PER_DAY
    disabled = state.apply(c.SetKeyRotation(KEY, False, 365, 700.0))
    assert isinstance(disabled, Applied)
    assert (disabled.value.rotation_enabled, disabled.value.next_rotation_at) == (False, None)
    assert [b.version for b in disabled.value.backing_keys] == [1, 2, 3]
    assert state.keys[KEY].epoch == 1


def test_rotation_races_and_limits() -> None:
    state = build(create_key_cmd(KEY), c.RotateKey(KEY, b"w2", ROTATION_ON_DEMAND, 1, 1, 1.0))
    before = snapshot_without_count(state)
    # Another leader's automatic rotation won: nothing to do.
    assert state.apply(c.RotateKey(KEY, b"x", ROTATION_AUTOMATIC, 1, 1, 2.0)) == Applied(None)
    arn = key_arn(REGION, ACCOUNT, KEY)
    assert state.apply(c.RotateKey(KEY, b"x", ROTATION_ON_DEMAND, 1, 5, 2.0)) == Rejected(
        "ConflictException", f"{arn} was rotated concurrently; retry the request.")
    # RotateKeyOnDemand: "You can perform on-demand key rotation a maximum of 25 times per KMS
    # key." (the limit travels in the command)
    assert state.apply(c.RotateKey(KEY, b"x", ROTATION_ON_DEMAND, 2, 1, 2.0)) == Rejected(
        "LimitExceededException", f"{arn} has reached the limit of 1 on-demand rotations.")
    assert snapshot_without_count(state) == before


@pytest.mark.parametrize("cmd", [c.SetKeyRotation(KEY, True, 365, 1.0),
                                 c.RotateKey(KEY, b"w", ROTATION_ON_DEMAND, 1, 25, 1.0)],
                         ids=lambda cmd: cmd.op)
def test_rotation_of_a_disabled_key_is_refused(cmd: c.Command) -> None:
    state = build(create_key_cmd(KEY), c.SetKeyEnabled(KEY, False, 1.0))
    assert state.apply(cmd) == Rejected("DisabledException",
                                        f"{key_arn(REGION, ACCOUNT, KEY)} is disabled.")


def test_automatic_rotation_after_rotation_was_disabled_is_a_no_op() -> None:
    # The scheduler saw rotation enabled at version 1 and proposed; DisableKeyRotation
    # committed first.
    state = build(create_key_cmd(KEY), c.SetKeyRotation(KEY, True, 365, 0.0),
                  c.SetKeyRotation(KEY, False, 365, 10.0))
    before = snapshot_without_count(state)
    assert state.apply(c.RotateKey(KEY, b"w2", ROTATION_AUTOMATIC, 1, 25, 20.0)) == Applied(None)
    assert snapshot_without_count(state) == before


# --- plain cases: aliases ---------------------------------------------------------------------

def test_create_alias_and_duplicate() -> None:
    # CreateAlias: "The alias must be unique in the account and Region, but you can have aliases
    # with the same name in different Regions."
    state = build(create_key_cmd(KEY), create_key_cmd(KEY2, OTHER_REGION))
    created = state.apply(c.CreateAlias(REGION, "alias/a", KEY, 5.0))
    assert created == Applied(AliasRecord(REGION, "alias/a", KEY, 5.0, 5.0))
    assert state.apply(c.CreateAlias(REGION, "alias/a", KEY, 6.0)) == Rejected(
        "AlreadyExistsException",
        f"An alias with the name arn:aws:kms:{REGION}:{ACCOUNT}:alias/a already exists")
    assert isinstance(state.apply(c.CreateAlias(OTHER_REGION, "alias/a", KEY2, 7.0)), Applied)
    assert set(state.aliases) == {(REGION, "alias/a"), (OTHER_REGION, "alias/a")}


def test_alias_names_are_case_sensitive() -> None:
    state = build(create_key_cmd(KEY), c.CreateAlias(REGION, "alias/a", KEY, 1.0))
    assert isinstance(state.apply(c.CreateAlias(REGION, "alias/A", KEY, 1.0)), Applied)


def test_create_alias_to_missing_key() -> None:
    assert KmsState().apply(c.CreateAlias(REGION, "alias/a", KEY, 1.0)) == Rejected(
        "NotFoundException", f"Key '{KEY}' does not exist")


def test_create_alias_to_key_in_another_region() -> None:
    # CreateAlias: "You can associate the alias with any customer managed key in the same
    # Amazon Web Services Region."
    state = build(create_key_cmd(KEY))
    assert state.apply(c.CreateAlias(OTHER_REGION, "alias/a", KEY, 1.0)) == Rejected(
        "NotFoundException", f"Key '{KEY}' does not exist")


def test_update_alias() -> None:
    state = build(create_key_cmd(KEY), create_key_cmd(KEY2),
                  c.CreateAlias(REGION, "alias/a", KEY, 1.0))
    assert state.apply(c.UpdateAlias(REGION, "alias/a", KEY2, 2.0)) == Applied(
        AliasRecord(REGION, "alias/a", KEY2, 1.0, 2.0))


def test_update_missing_alias() -> None:
    state = build(create_key_cmd(KEY))
    assert state.apply(c.UpdateAlias(REGION, "alias/nope", KEY, 1.0)) == Rejected(
        "NotFoundException", f"Alias arn:aws:kms:{REGION}:{ACCOUNT}:alias/nope is not found.")


def test_update_alias_to_missing_key() -> None:
    state = build(create_key_cmd(KEY), c.CreateAlias(REGION, "alias/a", KEY, 1.0))
    assert state.apply(c.UpdateAlias(REGION, "alias/a", KEY2, 1.0)) == Rejected(
        "NotFoundException", f"Key '{KEY2}' does not exist")


def test_update_alias_to_key_in_another_region() -> None:
    # UpdateAlias: "The alias and the KMS key must be in the same Amazon Web Services account
    # and Region."
    state = build(create_key_cmd(KEY), create_key_cmd(KEY2, OTHER_REGION),
                  c.CreateAlias(REGION, "alias/a", KEY, 1.0))
    assert state.apply(c.UpdateAlias(REGION, "alias/a", KEY2, 1.0)) == Rejected(
        "NotFoundException", f"Key '{KEY2}' does not exist")
    assert state.aliases[(REGION, "alias/a")].target_key_id == KEY


def test_delete_alias() -> None:
    state = build(create_key_cmd(KEY), c.CreateAlias(REGION, "alias/a", KEY, 1.0))
    assert state.apply(c.DeleteAlias(OTHER_REGION, "alias/a")) == Rejected(
        "NotFoundException", "Alias alias/a is not found.")
    assert state.apply(c.DeleteAlias(REGION, "alias/a")) == Applied(None)
    assert state.aliases == {}
    assert state.apply(c.DeleteAlias(REGION, "alias/a")) == Rejected(
        "NotFoundException", "Alias alias/a is not found.")
    # DeleteAlias: "you can delete and change the aliases of a KMS key without affecting the
    # KMS key."
    assert state.keys[KEY] == build(create_key_cmd(KEY)).keys[KEY]


# --- plain cases: cluster ---------------------------------------------------------------------

def test_put_access_key_first_one_wins() -> None:
    state = KmsState()
    first = c.PutAccessKey("AKIA1", "arn:aws:iam::1:user/a", ACCOUNT, b"s1", 1.0)
    assert state.apply(first) == Applied(True)
    before = snapshot_without_count(state)
    assert state.apply(dataclasses.replace(first, wrapped_secret=b"s2")) == Applied(False)
    assert snapshot_without_count(state) == before
    assert state.access_keys["AKIA1"].wrapped_secret == b"s1"


def test_register_node_replaces_the_node_record() -> None:
    state = KmsState()
    assert state.apply(c.RegisterNode("n1", "az1", "h:1", "u1", "a1")) == Applied(None)
    assert state.apply(c.RegisterNode("n1", "az2", "h:2", "u2", "a2")) == Applied(None)
    assert (state.nodes["n1"].az, state.nodes["n1"].raft_address) == ("az2", "h:2")


def test_init_cluster_first_value_wins() -> None:
    state = KmsState()
    assert state.apply(c.InitCluster("kcv-1")) == Applied("kcv-1")
    assert state.apply(c.InitCluster("kcv-2")) == Applied("kcv-1")
    assert state.domain_key_check == "kcv-1"


def test_barrier_changes_nothing_but_the_count() -> None:
    state = build(create_key_cmd(KEY))
    before = snapshot_without_count(state)
    assert state.apply(c.Barrier()) == Applied(None)
    assert snapshot_without_count(state) == before
    assert state.applied_count == 2


def test_unknown_command_is_refused_as_internal_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Unheard(c.Command):
        pass

    try:
        state = KmsState()
        assert state.apply(Unheard()) == Rejected("KMSInternalException",
                                                  "unknown command Unheard")
        assert state.applied_count == 1
    finally:
        c._COMMANDS.pop("Unheard", None)  # registered by __init_subclass__


def test_alias_arn_format() -> None:
    assert alias_arn(REGION, ACCOUNT, "alias/x") == f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/x"


# --- purity -----------------------------------------------------------------------------------

def _forbidden(*_: Any, **__: Any) -> Any:
    raise AssertionError("apply() must read no clock, draw no random number and do no I/O")


_IMPURE = ("time.time", "time.time_ns", "time.monotonic", "time.perf_counter", "random.random",
           "random.getrandbits", "random.randbytes", "os.urandom", "secrets.token_bytes",
           "uuid.uuid1", "uuid.uuid4", "builtins.open")


@settings(max_examples=15, deadline=None)
@given(cmds=sequences(min_size=50, max_size=120), seed_pending=st.booleans())
def test_apply_reads_no_clock_and_draws_no_randomness(cmds: list[c.Command],
                                                      seed_pending: bool) -> None:
    state = fresh(seed_pending)
    patches = [mock.patch(target, side_effect=_forbidden) for target in _IMPURE]
    for patch in patches:
        patch.start()
    try:
        # Sanity: the patches are live.
        with pytest.raises(AssertionError):
            time.time()
        with pytest.raises(AssertionError):
            uuid.uuid4()
        for cmd in cmds:
            state.apply(cmd)
        state.to_snapshot()
    finally:
        for patch in reversed(patches):
            patch.stop()
    # Unpatched again.
    assert time.time() > 0 and random.random() < 1 and len(os.urandom(1)) == 1
    assert len(secrets.token_bytes(1)) == 1
