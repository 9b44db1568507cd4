"""The ciphertext blob that Encrypt and GenerateDataKey return, and Decrypt reads.

Layout, version 1 (all integers big-endian):

    offset  size  field
    0       1     format version (1)
    1       1     kdf id: 0 = AES-256-GCM directly under the backing key
    2       16    KMS key id (UUID bytes)
    18      4     backing-key version (u32), so Decrypt needs no KeyId
    22      12    GCM nonce
    34      n     ciphertext
    34+n    16    GCM tag

The 34-byte header is part of the GCM additional authenticated data (with the
canonical encryption context), so no header field can be changed without the
tag failing. Callers treat the blob as opaque; any blob that does not parse is
an InvalidCiphertextException, whatever the cause.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

FORMAT_VERSION = 1
KDF_NONE = 0
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(">BB16sI12s")
HEADER_BYTES = _HEADER.size


class MalformedCiphertext(ValueError):
    """Not a ciphertext blob this service produced. Deliberately without detail."""


@dataclass(frozen=True)
class CiphertextBlob:
    key_id: str
    backing_version: int
    nonce: bytes
    ciphertext_and_tag: bytes
    kdf: int = KDF_NONE
    # The header as `parse` read it: the same bytes packing the fields gives (the layout
    # has no slack), kept so Decrypt's AAD is not packed again from a key id string.
    read_header: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def header(self) -> bytes:
        if self.read_header is not None:
            return self.read_header
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"a GCM nonce is {NONCE_BYTES} bytes")
        return _HEADER.pack(FORMAT_VERSION, self.kdf, uuid.UUID(self.key_id).bytes,
                            self.backing_version, self.nonce)

    def to_bytes(self) -> bytes:
        return self.header + self.ciphertext_and_tag


def header_for(key_id: str, backing_version: int, nonce: bytes) -> bytes:
    return CiphertextBlob(key_id, backing_version, nonce, b"").header


def parse(blob: bytes) -> CiphertextBlob:
    if len(blob) < HEADER_BYTES + TAG_BYTES:
        raise MalformedCiphertext()
    version, kdf, key_bytes, backing_version, nonce = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION or kdf != KDF_NONE or backing_version == 0:
        raise MalformedCiphertext()
    digits = key_bytes.hex()  # formatted as str(uuid.UUID(bytes=key_bytes)) is
    key_id = f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
    return CiphertextBlob(key_id, backing_version, nonce, blob[HEADER_BYTES:], kdf,
                          bytes(blob[:HEADER_BYTES]))
