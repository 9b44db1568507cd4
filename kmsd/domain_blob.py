"""Which domain-key generation wraps or seals a blob: the tag on every wrapped blob.

A blob made under domain-key generation 1 is the bare token output, as it
always was: a CKM_AES_KEY_WRAP_PAD blob (a multiple of 8 bytes long) or a
sealed secret (nonce || AES-GCM ciphertext || tag). A blob made under any
later generation carries a 12-byte header, `MAGIC (8 bytes) || generation
(uint32, big-endian)`, in front of the token output.

Why this is unambiguous:
- a tagged key-wrap blob is 4 more than a multiple of 8 bytes long, an untagged
  one a multiple of 8, so `wrap_generation` never mistakes one for the other;
- a generation-1 sealed secret starts with a random 96-bit nonce, which
  matches MAGIC with probability 2**-64. `seal_generation` reads such a blob
  as tagged; opening it under that generation then fails authentication, and
  the HSM layer falls back to generation 1 (kmsd.hsm.partition.unseal).

Pure: no HSM, no I/O. The state machine uses it to count which blobs each
generation still wraps; the HSM layer uses it to pick the key to unwrap with.
"""

from __future__ import annotations

MAGIC = b"kmsd/dk\x00"
HEADER_BYTES = len(MAGIC) + 4
FIRST_GENERATION = 1
_KWP_BLOCK = 8


def tag(generation: int, body: bytes) -> bytes:
    """The blob as stored: bare for generation 1, header + body for later generations."""
    if generation == FIRST_GENERATION:
        return body
    if not FIRST_GENERATION < generation < 2**32:
        raise ValueError(f"no domain-key generation {generation}")
    return MAGIC + generation.to_bytes(4, "big") + body


def _tagged(blob: bytes) -> int | None:
    if len(blob) > HEADER_BYTES and blob[:len(MAGIC)] == MAGIC:
        generation = int.from_bytes(blob[len(MAGIC):HEADER_BYTES], "big")
        if generation > FIRST_GENERATION:
            return generation
    return None


def split_wrap(blob: bytes) -> tuple[int, bytes]:
    """(generation, token output) of a key-wrap (CKM_AES_KEY_WRAP_PAD) blob; exact."""
    if len(blob) % _KWP_BLOCK == HEADER_BYTES % _KWP_BLOCK:
        generation = _tagged(blob)
        if generation is not None:
            return generation, blob[HEADER_BYTES:]
    return FIRST_GENERATION, blob


def split_seal(blob: bytes) -> tuple[int, bytes]:
    """(generation, token output) a sealed secret names (see the module docstring)."""
    generation = _tagged(blob)
    if generation is not None:
        return generation, blob[HEADER_BYTES:]
    return FIRST_GENERATION, blob


def wrap_generation(blob: bytes) -> int:
    return split_wrap(blob)[0]


def seal_generation(blob: bytes) -> int:
    return split_seal(blob)[0]
