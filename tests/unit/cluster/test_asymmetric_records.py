"""Asymmetric keys in the replicated state: the public key travels in CreateKey and lives in
KeyRecord, and log entries and snapshots written before it existed still read."""

from __future__ import annotations

import msgpack

from cluster import commands as c
from cluster.state import Applied, KmsState

KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"
SPKI = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + b"\x04" * 65


def create(public_key: bytes | None) -> c.CreateKey:
    return c.CreateKey(key_id=KEY, region="us-east-1", account_id="111122223333",
                       description="", key_usage="SIGN_VERIFY", key_spec="ECC_NIST_P256",
                       origin="AWS_KMS", policy="{}", tags=(), wrapped_backing_key=b"w" * 48,
                       at=1.0, public_key=public_key)


def test_public_key_goes_from_the_command_into_the_record_and_the_snapshot() -> None:
    state = KmsState()
    result = state.apply(c.decode(c.encode(create(SPKI))))
    assert isinstance(result, Applied)
    assert result.value.public_key == SPKI
    assert result.value.backing_keys[0].wrapped == b"w" * 48
    restored = KmsState()
    restored.restore_snapshot(state.to_snapshot())
    assert restored.keys[KEY].public_key == SPKI
    assert restored.to_snapshot() == state.to_snapshot()


def test_a_create_key_entry_written_before_public_keys_existed_still_decodes() -> None:
    wire = msgpack.unpackb(c.encode(create(None)), raw=False)
    del wire["args"]["public_key"]
    old = c.decode(msgpack.packb(wire, use_bin_type=True))
    assert old == create(None)
    state = KmsState()
    assert state.apply(old).value.public_key is None


def test_a_snapshot_written_before_public_keys_existed_still_restores() -> None:
    state = KmsState()
    state.apply(create(None))
    raw = msgpack.unpackb(state.to_snapshot(), raw=False)
    del raw["keys"][0]["public_key"]
    restored = KmsState()
    restored.restore_snapshot(msgpack.packb(raw, use_bin_type=True))
    assert restored.keys[KEY] == state.keys[KEY]
