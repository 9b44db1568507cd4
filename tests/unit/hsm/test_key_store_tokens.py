"""kmsd.service.key_store_tokens on real SoftHSM2 tokens: a custom key store's token opened
with its sealed PIN, its store key found and checked, and keys made there unusable by the
node's own token. AWS ConnectionErrorCode names for what goes wrong."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.state import CustomKeyStoreRecord
from kmsd import domain_blob
from kmsd.hsm.partition import HsmError, HsmPartition
from kmsd.service.key_store_tokens import (
    CLUSTER_NOT_FOUND,
    INVALID_CREDENTIALS,
    KeyStoreTokens,
    StoreUnreachable,
    password_aad,
)
from tests.unit.hsm.conftest import SoftHsm

STORE_ID = "cks-1234567890abcdef0"


def _store(domain: HsmPartition, label: str, pin: str, store_id: str = STORE_ID,
           key_check: str | None = None) -> CustomKeyStoreRecord:
    return CustomKeyStoreRecord(
        store_id, "us-east-1", "111122223333", "store", "AWS_CLOUDHSM", label, "anchor",
        domain.seal(pin.encode(), password_aad(store_id)), "CONNECTED", 0.0,
        key_check=key_check)


@pytest.fixture(scope="module")
def store_token(softhsm: SoftHsm) -> tuple[str, str, str]:
    """(label, PIN, store key check value) of a token that holds a store key."""
    token = softhsm.new_token("store")
    with_key = softhsm.open_partition(token)  # makes the store key
    check = with_key.domain_key_check_value()
    with_key.close()  # the last session ends the login, so KeyStoreTokens can log in
    return token.label, token.pin, check


def test_keys_made_in_the_store_live_only_there(softhsm: SoftHsm, hsm_partition: HsmPartition,
                                                store_token: tuple[str, str, str]) -> None:
    label, pin, check = store_token
    tokens = KeyStoreTokens(softhsm.module_path, hsm_partition)
    try:
        store = _store(hsm_partition, label, pin)
        assert tokens.connect(store).key_check == check
        partition = tokens.partition(store)
        wrapped = partition.generate_wrapped_aes_key()
        sealed = partition.encrypt_gcm(wrapped, b"n" * 12, b"aad", b"secret")
        assert partition.decrypt_gcm(wrapped, b"n" * 12, b"aad", sealed) == b"secret"
        # The node's own token cannot unwrap it: the material is the store token's.
        with pytest.raises(HsmError):
            hsm_partition.decrypt_gcm(wrapped, b"n" * 12, b"aad", sealed)
        # A token whose store key is not the one the store recorded is refused.
        tokens.close(STORE_ID)
        with pytest.raises(StoreUnreachable) as refused:
            tokens.partition(_store(hsm_partition, label, pin, key_check="0" * 16))
        assert refused.value.code == CLUSTER_NOT_FOUND
    finally:
        tokens.close_all()


def test_connection_error_codes(softhsm: SoftHsm, hsm_partition: HsmPartition,
                                store_token: tuple[str, str, str]) -> None:
    label, pin, _ = store_token
    tokens = KeyStoreTokens(softhsm.module_path, hsm_partition)
    try:
        for store, code in (
                (_store(hsm_partition, label, pin + "x"), INVALID_CREDENTIALS),
                (_store(hsm_partition, "cluster-nosuchtoken", pin), CLUSTER_NOT_FOUND)):
            with pytest.raises(StoreUnreachable) as refused:
                tokens.connect(store)
            assert refused.value.code == code
            assert pin not in str(refused.value)
        # A token without a store key is not a key store.
        bare = softhsm.new_token("bare")
        with pytest.raises(StoreUnreachable) as refused:
            tokens.connect(_store(hsm_partition, bare.label, bare.pin))
        assert refused.value.code == CLUSTER_NOT_FOUND
        # The sealed PIN is bound to its store: moved to another store id, it does not open.
        moved = _store(hsm_partition, label, pin)
        moved = CustomKeyStoreRecord(**{**moved.__dict__, "store_id": "cks-other"})
        with pytest.raises(StoreUnreachable):
            tokens.connect(moved)
    finally:
        tokens.close_all()


def test_a_store_password_opens_under_any_live_generation(
        softhsm: SoftHsm, store_token: tuple[str, str, str]) -> None:
    """A domain-key rotation re-seals the store's password (kmsd.service.domain_rotation);
    the store's own token, and the keys wrapped under its store key, are not touched."""
    label, pin, check = store_token
    domain = softhsm.open_partition(softhsm.new_token("store-domain"))
    tokens = KeyStoreTokens(softhsm.module_path, domain)
    try:
        active = [1]
        domain.generation_source = lambda: active[0]
        old = _store(domain, label, pin)
        store_key_blob = tokens.partition(old).generate_wrapped_aes_key()
        # Bare, like a generation-1 domain blob: which is why the state machine never reads
        # a store key's blob as a domain blob.
        assert domain_blob.wrap_generation(store_key_blob) == 1
        tokens.close(STORE_ID)
        domain.create_domain_key(2)
        active[0] = 2
        new = dataclasses.replace(old, sealed_password=domain.reseal(
            old.sealed_password, password_aad(STORE_ID)))
        assert domain_blob.seal_generation(new.sealed_password) == 2
        # While both generations are live, either seal opens the token.
        for store in (old, new):
            assert tokens.connect(store).key_check == check
            tokens.close(STORE_ID)
        domain.destroy_generation(1)
        with pytest.raises(StoreUnreachable):
            tokens.connect(old)
        assert tokens.connect(new).key_check == check
        store_partition = tokens.partition(new)
        assert store_partition.held_generations() == {1: check}
        nonce = b"n" * 12
        sealed = store_partition.encrypt_gcm(store_key_blob, nonce, b"", b"kept")
        assert store_partition.decrypt_gcm(store_key_blob, nonce, b"", sealed) == b"kept"
    finally:
        tokens.close_all()
        domain.close()
