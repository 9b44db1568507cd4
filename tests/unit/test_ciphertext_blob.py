"""Tests for kmsd.ciphertext_blob: the layout Encrypt returns and Decrypt parses.

Any blob that does not parse must raise MalformedCiphertext and nothing else, so that the
service can answer one opaque InvalidCiphertextException whatever the cause.
"""

from __future__ import annotations

import struct
import uuid

import botocore.session
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd import ciphertext_blob as cb

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
MODEL = botocore.session.get_session().get_service_model("kms")

key_ids = st.uuids().map(str)
versions = st.integers(min_value=1, max_value=2**32 - 1)
nonces = st.binary(min_size=cb.NONCE_BYTES, max_size=cb.NONCE_BYTES)
bodies = st.binary(min_size=cb.TAG_BYTES, max_size=300)  # ciphertext (maybe empty) + tag
blobs = st.builds(cb.CiphertextBlob, key_id=key_ids, backing_version=versions, nonce=nonces,
                  ciphertext_and_tag=bodies)


def valid_blob(body: bytes = b"c" * 5 + b"t" * cb.TAG_BYTES) -> bytes:
    return cb.CiphertextBlob(KEY_ID, 7, bytes(range(12)), body).to_bytes()


def parse_or_refuse(data: bytes) -> cb.CiphertextBlob | None:
    try:
        blob = cb.parse(data)
    except cb.MalformedCiphertext:
        return None
    assert isinstance(blob, cb.CiphertextBlob)
    # The header parse keeps is the one its fields pack to, and the key id is the UUID's.
    assert blob.key_id == str(uuid.UUID(bytes=data[2:18]))
    assert blob.header == cb.header_for(blob.key_id, blob.backing_version, blob.nonce)
    return blob


@settings(max_examples=150, deadline=None)
@given(blob=blobs)
def test_round_trip(blob: cb.CiphertextBlob) -> None:
    data = blob.to_bytes()
    assert len(data) == cb.HEADER_BYTES + len(blob.ciphertext_and_tag)
    assert parse_or_refuse(data) == blob
    assert data[: cb.HEADER_BYTES] == blob.header == cb.header_for(
        blob.key_id, blob.backing_version, blob.nonce)


def test_header_is_exactly_34_bytes_with_the_documented_layout() -> None:
    assert cb.HEADER_BYTES == 34
    nonce = bytes(range(100, 112))
    header = cb.header_for(KEY_ID, 0x01020304, nonce)
    assert len(header) == 34
    assert header[0] == cb.FORMAT_VERSION == 1
    assert header[1] == cb.KDF_NONE == 0
    assert header[2:18] == uuid.UUID(KEY_ID).bytes
    assert header[18:22] == b"\x01\x02\x03\x04"  # big-endian u32
    assert header[22:34] == nonce


def test_smallest_blob_is_header_plus_tag() -> None:
    # An empty ciphertext is still a blob: header and a 16-byte tag.
    data = valid_blob(b"\x00" * cb.TAG_BYTES)
    assert len(data) == 50
    assert cb.parse(data).ciphertext_and_tag == b"\x00" * cb.TAG_BYTES


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=120))
def test_parse_of_arbitrary_bytes_raises_only_malformed(data: bytes) -> None:
    blob = parse_or_refuse(data)
    if blob is not None:  # whatever parses re-serialises to the same bytes
        assert blob.to_bytes() == data


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=50, max_size=120))
def test_parse_of_header_shaped_bytes_raises_only_malformed(data: bytes) -> None:
    # Force a valid version and kdf so that parsing gets past the first checks more often.
    data = bytes([cb.FORMAT_VERSION, cb.KDF_NONE]) + data[2:]
    blob = parse_or_refuse(data)
    if blob is not None:
        assert blob.to_bytes() == data
        assert blob.backing_version >= 1


@pytest.mark.parametrize("length", range(cb.HEADER_BYTES + cb.TAG_BYTES))
def test_every_truncation_below_header_plus_tag_is_malformed(length: int) -> None:
    with pytest.raises(cb.MalformedCiphertext):
        cb.parse(valid_blob()[:length])


@pytest.mark.parametrize("bit", range(8))
@pytest.mark.parametrize("offset", [0, 1], ids=["version", "kdf"])
def test_bit_flips_of_version_and_kdf_are_malformed(offset: int, bit: int) -> None:
    data = bytearray(valid_blob())
    data[offset] ^= 1 << bit
    with pytest.raises(cb.MalformedCiphertext):
        cb.parse(bytes(data))


@settings(max_examples=50, deadline=None)
@given(blob=blobs, version=st.integers(0, 255), kdf=st.integers(0, 255))
def test_unknown_version_or_kdf_is_malformed(blob: cb.CiphertextBlob, version: int,
                                             kdf: int) -> None:
    data = bytearray(blob.to_bytes())
    data[0], data[1] = version, kdf
    if (version, kdf) == (cb.FORMAT_VERSION, cb.KDF_NONE):
        assert cb.parse(bytes(data)) == blob
    else:
        with pytest.raises(cb.MalformedCiphertext):
            cb.parse(bytes(data))


def test_backing_version_zero_is_malformed() -> None:
    data = bytearray(valid_blob())
    data[18:22] = b"\x00\x00\x00\x00"
    with pytest.raises(cb.MalformedCiphertext):
        cb.parse(bytes(data))


def test_malformed_carries_no_detail() -> None:
    with pytest.raises(cb.MalformedCiphertext) as info:
        cb.parse(b"\x02" + valid_blob()[1:])
    assert str(info.value) == ""
    assert info.value.args == ()


def test_max_size_blob_fits_the_ciphertext_blob_limit() -> None:
    # Encrypt, Plaintext: "Length Constraints: Minimum length of 1. Maximum length of 4096."
    # Decrypt, CiphertextBlob: "Length Constraints: Minimum length of 1. Maximum length of 6144."
    max_plaintext = MODEL.shape_for("PlaintextType").metadata["max"]
    max_blob = MODEL.shape_for("CiphertextType").metadata["max"]
    assert (max_plaintext, max_blob) == (4096, 6144)
    blob = cb.CiphertextBlob(KEY_ID, 2**32 - 1, b"\xff" * cb.NONCE_BYTES,
                             b"\xff" * (max_plaintext + cb.TAG_BYTES))
    data = blob.to_bytes()
    assert len(data) == 34 + 4096 + 16 == 4146
    assert len(data) <= max_blob
    assert cb.parse(data) == blob


def test_backing_version_out_of_u32_range_cannot_be_serialised() -> None:
    with pytest.raises(struct.error):
        cb.header_for(KEY_ID, 2**32, b"\x00" * cb.NONCE_BYTES)


@pytest.mark.parametrize("nonce", [b"", b"\x01" * 11, b"\x01" * 13, b"\x01" * 16])
def test_nonce_of_wrong_length_is_refused(nonce: bytes) -> None:
    with pytest.raises((ValueError, struct.error)):
        cb.header_for(KEY_ID, 1, nonce)
