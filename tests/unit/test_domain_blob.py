"""kmsd.domain_blob: which domain-key generation a stored blob names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kmsd import domain_blob
from kmsd.domain_blob import HEADER_BYTES, MAGIC

# CKM_AES_KEY_WRAP_PAD output: a multiple of 8 bytes, at least 16.
kwp_bodies = st.integers(2, 200).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n))
generations = st.integers(2, 2**32 - 1)


@given(kwp_bodies)
def test_generation_1_blobs_are_stored_bare(body: bytes) -> None:
    assert domain_blob.tag(1, body) == body
    assert domain_blob.split_wrap(body) == (1, body)


@given(generations, kwp_bodies)
def test_later_generations_round_trip(generation: int, body: bytes) -> None:
    blob = domain_blob.tag(generation, body)
    assert len(blob) == len(body) + HEADER_BYTES
    assert domain_blob.split_wrap(blob) == (generation, body)
    assert domain_blob.split_seal(blob) == (generation, body)


@given(generations, st.integers(2, 100))
def test_a_bare_wrap_blob_that_starts_like_a_header_is_still_generation_1(
        generation: int, blocks: int) -> None:
    # Exact by length: a tagged key-wrap blob is 4 more than a multiple of 8 bytes long.
    body = MAGIC + generation.to_bytes(4, "big") + bytes(8 * blocks - HEADER_BYTES)
    assert len(body) % 8 == 0
    assert domain_blob.split_wrap(body) == (1, body)


def test_generation_numbers_outside_the_range_are_refused() -> None:
    for bad in (0, -1, 2**32):
        try:
            domain_blob.tag(bad, bytes(16))
        except ValueError:
            continue
        raise AssertionError(f"generation {bad} was accepted")


@given(st.binary(max_size=64))
def test_untagged_sealed_secrets_are_generation_1(sealed: bytes) -> None:
    if not sealed.startswith(MAGIC):
        assert domain_blob.split_seal(sealed) == (1, sealed)
