"""Custom key stores in the pure state machine: creation limits and uniqueness, connection
states, what may change when, deletion, and keys created in a store -- no Raft, no HSM.

AWS references: CustomKeyStoreInvalidStateException ("ConnectCustomKeyStore ... with a
ConnectionState of DISCONNECTING or FAILED"; "CreateKey ... in a custom key store that is not
connected"; "DisconnectCustomKeyStore ... DISCONNECTING or DISCONNECTED"; "UpdateCustomKeyStore
or DeleteCustomKeyStore ... not disconnected. UpdateCustomKeyStore can be called on a custom key
store in the CONNECTED state only to update NewCustomKeyStoreName"),
CustomKeyStoreNameInUseException, CloudHsmClusterInUseException, CustomKeyStoreHasCMKsException,
LimitExceededException (10 stores per account and Region).
"""

from __future__ import annotations

from cluster import commands as c
from cluster.state import Applied, KmsState, Rejected

T0 = 1_800_000_000.0
STORE = "cks-1234567890abcdef0"
KEY = "11111111-2222-3333-4444-555555555555"


def _create(state: KmsState, store_id: str = STORE, name: str = "one",
            cluster: str = "cluster-aaaaaaaaaaa", account: str = "111122223333",
            max_stores: int = 10) -> Applied | Rejected:
    return state.apply(c.CreateCustomKeyStore(store_id, "us-east-1", account, name, cluster,
                                              "anchor", b"sealed", T0, max_stores))


def _connection(state: KmsState, to: str, code: str | None = None,
                check: str | None = None) -> Applied | Rejected:
    return state.apply(c.SetCustomKeyStoreConnection(STORE, to, code, check))


def _key_in_store(state: KmsState, key_id: str = KEY) -> Applied | Rejected:
    return state.apply(c.CreateKey(key_id, "us-east-1", "111122223333", "", "ENCRYPT_DECRYPT",
                                   "SYMMETRIC_DEFAULT", "AWS_CLOUDHSM", "{}", (), b"w" * 40,
                                   T0, custom_key_store_id=STORE))


def test_names_clusters_and_limits() -> None:
    state = KmsState()
    store = _create(state).value
    assert store.connection_state == "DISCONNECTED" and store.store_type == "AWS_CLOUDHSM"
    assert _create(state, "cks-b", name="one", cluster="cluster-bbbbbbbbbbb").error_type == \
        "CustomKeyStoreNameInUseException"
    assert _create(state, "cks-b", name="two").error_type == "CloudHsmClusterInUseException"
    # Another account may use the same name.
    assert isinstance(_create(state, "cks-c", cluster="cluster-ccccccccccc",
                              account="444455556666"), Applied)
    assert _create(state, "cks-d", name="two", cluster="cluster-ddddddddddd",
                   max_stores=1).error_type == "LimitExceededException"


def test_connection_states() -> None:
    state = KmsState()
    _create(state)
    assert _key_in_store(state).error_type == "CustomKeyStoreInvalidStateException"
    assert _connection(state, "DISCONNECTED").error_type == "CustomKeyStoreInvalidStateException"
    failed = _connection(state, "FAILED", "INVALID_CREDENTIALS").value
    assert (failed.connection_state, failed.error_code) == ("FAILED", "INVALID_CREDENTIALS")
    assert _connection(state, "CONNECTED", check="k1").error_type == \
        "CustomKeyStoreInvalidStateException"
    assert _connection(state, "DISCONNECTED").value.error_code is None
    connected = _connection(state, "CONNECTED", check="k1").value
    assert connected.connection_state == "CONNECTED" and connected.key_check == "k1"
    assert _key_in_store(state).value.custom_key_store_id == STORE
    _connection(state, "DISCONNECTED")
    # A token with another store key cannot serve the store's keys.
    other = _connection(state, "CONNECTED", check="k2").value
    assert (other.connection_state, other.error_code) == ("FAILED", "CLUSTER_NOT_FOUND")


def test_updates_and_deletion() -> None:
    state = KmsState()
    _create(state)
    _create(state, "cks-b", name="two", cluster="cluster-bbbbbbbbbbb")
    _connection(state, "CONNECTED", check="k1")
    refused = state.apply(c.UpdateCustomKeyStore(STORE, None, None, b"new-sealed"))
    assert refused.error_type == "CustomKeyStoreInvalidStateException"
    assert state.apply(c.UpdateCustomKeyStore(STORE, "renamed", None, None)).value.name == \
        "renamed"
    assert state.apply(c.UpdateCustomKeyStore(STORE, "two", None, None)).error_type == \
        "CustomKeyStoreNameInUseException"
    _key_in_store(state)
    assert state.apply(c.DeleteCustomKeyStore(STORE)).error_type == \
        "CustomKeyStoreInvalidStateException"
    _connection(state, "DISCONNECTED")
    updated = state.apply(c.UpdateCustomKeyStore(STORE, None, "cluster-ccccccccccc",
                                                 b"new-sealed")).value
    assert (updated.cluster_id, updated.sealed_password) == ("cluster-ccccccccccc",
                                                             b"new-sealed")
    assert state.apply(c.DeleteCustomKeyStore(STORE)).error_type == \
        "CustomKeyStoreHasCMKsException"
    state.apply(c.ScheduleKeyDeletion(KEY, T0 + 1, 7))
    state.apply(c.DeleteKey(KEY, T0 + 2))
    assert isinstance(state.apply(c.DeleteCustomKeyStore(STORE)), Applied)
    assert state.apply(c.DeleteCustomKeyStore(STORE)).error_type == \
        "CustomKeyStoreNotFoundException"


def test_snapshot_round_trip() -> None:
    state = KmsState()
    _create(state)
    _connection(state, "CONNECTED", check="k1")
    _key_in_store(state)
    copy = KmsState()
    copy.restore_snapshot(state.to_snapshot())
    assert copy.fingerprint() == state.fingerprint()
    assert copy.custom_key_stores[STORE].key_check == "k1"
    assert copy.keys[KEY].custom_key_store_id == STORE
    command = c.SetCustomKeyStoreConnection(STORE, "FAILED", "USER_LOCKED_OUT")
    assert c.decode(c.encode(command)) == command
