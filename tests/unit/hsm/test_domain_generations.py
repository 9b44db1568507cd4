"""Domain-key generations in real SoftHSM2 tokens: wrapping under the active generation,
re-wrapping every kind of stored key, cloning a generation token to token, and bringing a
token in line with the replicated state (kmsd.service.domain_members.reconcile)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pkcs11 import Mechanism
from pkcs11.mechanisms import GCMParams

from cluster import domain_generations as dg
from kmsd import domain_blob
from kmsd.hsm import domain_clone
from kmsd.hsm.asymmetric import AsymmetricKeys
from kmsd.hsm.partition import (
    DOMAIN_KEY_LABEL,
    GCM_TAG_BITS,
    HsmAuthenticationFailed,
    HsmError,
    HsmPartition,
    label_generation,
)
from kmsd.hsm.rewrap import rewrap_key
from kmsd.service.domain_members import missing_live, reconcile
from tests.unit.hsm.conftest import SoftHsm

SPECS = ("SYMMETRIC_DEFAULT", "HMAC_256", "ECC_NIST_P256", "RSA_2048")


@pytest.fixture()
def token_pair(softhsm: SoftHsm) -> Iterator[tuple[HsmPartition, HsmPartition]]:
    first = softhsm.open_partition(softhsm.new_token("gen-a"))
    second = softhsm.open_partition(softhsm.new_token("gen-b"), with_domain_key=False)
    yield first, second
    first.close()
    second.close()


def wrapped_keys(partition: HsmPartition) -> dict[str, bytes]:
    keys = AsymmetricKeys(partition)
    blobs = {"SYMMETRIC_DEFAULT": partition.generate_wrapped_aes_key()}
    for spec in SPECS[1:]:
        blobs[spec] = keys.generate(spec).wrapped_private
    return blobs


def test_labels_name_generations() -> None:
    assert label_generation(DOMAIN_KEY_LABEL) == 1
    assert label_generation(DOMAIN_KEY_LABEL + "-g7") == 7
    for other in ("kmsd-transport-key", DOMAIN_KEY_LABEL + "-g1", DOMAIN_KEY_LABEL + "-gx", ""):
        assert label_generation(other) is None


def test_every_stored_kind_rewraps_and_still_works_after_the_old_key_is_gone(
        token_pair: tuple[HsmPartition, HsmPartition]) -> None:
    hsm, _ = token_pair
    active = [1]
    hsm.generation_source = lambda: active[0]
    old = wrapped_keys(hsm)
    assert {domain_blob.wrap_generation(b) for b in old.values()} == {1}
    secret = hsm.seal(b"the secret", b"aad")
    nonce = hsm.random(12)
    ciphertext = hsm.encrypt_gcm(old["SYMMETRIC_DEFAULT"], nonce, b"ctx", b"hello")
    keys = AsymmetricKeys(hsm)
    mac = keys.generate_mac(old["HMAC_256"], "HMAC_256", "HMAC_SHA_256", b"m")

    check = hsm.create_domain_key(2)
    assert hsm.held_generations() == {1: hsm.domain_key_check_value(1), 2: check}
    with pytest.raises(HsmError):
        hsm.create_domain_key(2)
    # Until the state activates generation 2, new blobs stay under generation 1.
    assert domain_blob.wrap_generation(hsm.generate_wrapped_aes_key()) == 1
    active[0] = 2
    assert domain_blob.wrap_generation(hsm.generate_wrapped_aes_key()) == 2
    new = {spec: rewrap_key(hsm, blob, spec) for spec, blob in old.items()}
    assert {domain_blob.wrap_generation(b) for b in new.values()} == {2}
    resealed = hsm.reseal(secret, b"aad")
    assert domain_blob.seal_generation(resealed) == 2

    # Both generations unwrap during the rotation.
    assert hsm.decrypt_gcm(old["SYMMETRIC_DEFAULT"], nonce, b"ctx", ciphertext) == b"hello"
    assert hsm.decrypt_gcm(new["SYMMETRIC_DEFAULT"], nonce, b"ctx", ciphertext) == b"hello"

    assert hsm.destroy_generation(1)
    assert hsm.held_generations() == {2: check}
    assert hsm.decrypt_gcm(new["SYMMETRIC_DEFAULT"], nonce, b"ctx", ciphertext) == b"hello"
    assert hsm.unseal(resealed, b"aad") == b"the secret"
    fresh = AsymmetricKeys(hsm)  # no cached handles
    assert fresh.verify_mac(new["HMAC_256"], "HMAC_256", "HMAC_SHA_256", b"m", mac)
    assert fresh.sign(new["ECC_NIST_P256"], "ECC_NIST_P256", "ECDSA_SHA_256", bytes(32),
                      "DIGEST")
    assert fresh.sign(new["RSA_2048"], "RSA_2048", "RSASSA_PSS_SHA_256", b"m", "RAW")
    # Generation 1's blobs are dead: its handles were evicted with it.
    with pytest.raises(HsmError):
        hsm.decrypt_gcm(old["SYMMETRIC_DEFAULT"], nonce, b"ctx", ciphertext)
    with pytest.raises(HsmError):
        rewrap_key(hsm, old["HMAC_256"], "HMAC_256")
    with pytest.raises(HsmAuthenticationFailed):
        hsm.unseal(secret, b"aad")


def test_a_generation_1_seal_whose_nonce_looks_like_a_tag_still_opens(
        token_pair: tuple[HsmPartition, HsmPartition]) -> None:
    hsm, _ = token_pair
    hsm.create_domain_key(2)
    hsm.generation_source = lambda: 1
    nonce = domain_blob.MAGIC + (2).to_bytes(4, "big")
    body = hsm.generation_key(1).encrypt(b"s", mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, b"a", GCM_TAG_BITS))
    blob = nonce + bytes(body)
    assert domain_blob.seal_generation(blob) == 2  # read as tagged ...
    assert hsm.unseal(blob, b"a") == b"s"  # ... and opened under generation 1


def test_generations_clone_token_to_token_for_a_join_and_for_a_rotation(
        token_pair: tuple[HsmPartition, HsmPartition]) -> None:
    donor, recipient = token_pair
    donor.create_domain_key(2)
    point = domain_clone.make_transport_key(recipient)
    donor_point, wrapped, sealed = domain_clone.wrap_domain_keys_for(donor, point, [1, 2],
                                                                     b"raft secret")
    assert domain_clone.accept_domain_keys(recipient, donor_point, wrapped, sealed) \
        == b"raft secret"
    assert recipient.held_generations() == donor.held_generations()
    with pytest.raises(HsmError):  # a joining token must be empty
        domain_clone.make_transport_key(recipient)

    donor.create_domain_key(3)
    label = domain_clone.rotation_transport_label(3)
    point = domain_clone.make_transport_key(recipient, label=label, for_join=False)
    donor_point, wrapped, _ = domain_clone.wrap_domain_keys_for(donor, point, [3])
    domain_clone.accept_domain_keys(recipient, donor_point, wrapped, label=label)
    assert recipient.held_generations() == donor.held_generations()
    with pytest.raises(HsmError):  # no second copy under one label
        domain_clone.accept_domain_keys(recipient, donor_point, wrapped, label=label)
    # The blob a donor wrapped unwraps in the recipient.
    donor.generation_source = recipient.generation_source = lambda: 3
    blob = donor.generate_wrapped_aes_key()
    nonce = donor.random(12)
    assert recipient.decrypt_gcm(blob, nonce, b"", donor.encrypt_gcm(blob, nonce, b"", b"x")) \
        == b"x"


def generation(number: int, check: str, state: str) -> dg.DomainGeneration:
    return dg.DomainGeneration(number, check, 0.0, state, 0.0)


def test_reconcile_destroys_retired_abandoned_and_foreign_later_generations(
        token_pair: tuple[HsmPartition, HsmPartition]) -> None:
    hsm, other = token_pair
    held = {1: hsm.domain_key_check_value(1), 2: hsm.create_domain_key(2),
            3: hsm.create_domain_key(3), 4: hsm.create_domain_key(4)}
    state = {1: generation(1, held[1], dg.RETIRED), 2: generation(2, held[2], dg.ACTIVE),
             3: generation(3, "another", dg.PENDING), 4: generation(4, held[4], dg.ABANDONED),
             5: generation(5, "missing", dg.PENDING)}
    assert reconcile(state, hsm) == {2: held[2]}
    assert hsm.held_generations() == {2: held[2]}
    assert missing_live(state, {2: held[2]}) == []
    assert missing_live({**state, 5: generation(5, "x", dg.RETIRING)}, {2: held[2]}) == [5]

    # Another cluster's generation 1 is never destroyed (the node refuses to serve instead).
    foreign = other.create_domain_key()
    assert reconcile({1: generation(1, "not-" + foreign, dg.RETIRED)}, other) == {1: foreign}
