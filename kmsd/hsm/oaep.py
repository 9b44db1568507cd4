"""RSAES-OAEP decoding on the host (RFC 8017 §7.1.2, step 3), for tokens that cannot.

SoftHSM2 2.6.1 does CKM_RSA_PKCS_OAEP with SHA-1 only (FACTS.md §0.2). For
RSAES_OAEP_SHA_256 the token does the raw RSA private-key operation
(CKM_RSA_X_509, the private key never leaves it) and hands this module the
encoded message EM = I2OSP(c^d mod n, k); this module strips the OAEP padding.

What it owns: MGF1 and EME-OAEP decoding. What it never does:
- reveal which check failed. Every failure -- a non-zero leading byte, a
  wrong label hash, a missing 0x01 separator, a non-zero padding byte, a bad
  length -- raises the same `HsmAuthenticationFailed()` with no message, after
  every check has been computed; there is no early return between the checks
  and no branch on secret data before the single decision at the end. (A
  decoder that answers differently, or in measurably different time, for
  "leading byte not zero" is Manger's padding oracle.) CPython gives no hard
  constant-time guarantee; this removes the data-dependent branches and
  comparisons, which is what can be done on the host.
- log, or put into an exception, the encoded message, the seed or the plaintext.
"""

from __future__ import annotations

import hashlib
import hmac

from kmsd.hsm.partition import HsmAuthenticationFailed

# hashlib names of the hashes KMS's RSAES_OAEP_* algorithms use (MGF1 uses the same hash).
SUPPORTED_HASHES = ("sha1", "sha256")


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 §B.2.1)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def decode(encoded_message: bytes, hash_name: str, label: bytes = b"") -> bytes:
    """EME-OAEP decoding of EM (k bytes, k = modulus length); returns the message M.

    Raises `HsmAuthenticationFailed()` -- one error, no detail -- for any invalid EM.
    """
    if hash_name not in SUPPORTED_HASHES:
        raise ValueError(f"unsupported OAEP hash {hash_name!r}")
    h_len = hashlib.new(hash_name).digest_size
    k = len(encoded_message)
    if k < 2 * h_len + 2:
        # Depends only on the public modulus length, not on the decryption.
        raise HsmAuthenticationFailed()

    l_hash = hashlib.new(hash_name, label).digest()
    y = encoded_message[0]
    masked_seed = encoded_message[1:1 + h_len]
    masked_db = encoded_message[1 + h_len:]
    seed = _xor(masked_seed, mgf1(masked_db, h_len, hash_name))
    db = _xor(masked_db, mgf1(seed, k - h_len - 1, hash_name))

    # DB = lHash' || PS (zero or more 0x00) || 0x01 || M. Scan all of it, whatever it holds.
    label_ok = int(hmac.compare_digest(db[:h_len], l_hash))
    y_ok = ((y - 1) >> 8) & 1                      # 1 iff y == 0 (y is 0..255)
    found = 0                                     # have we passed the 0x01 separator?
    separator = 0                                 # its index in DB, once found
    bad_padding = 0                               # a byte before it that is neither 0x00 nor 0x01
    for i in range(h_len, len(db)):
        byte = db[i]
        is_zero = ((byte - 1) >> 8) & 1
        is_one = (((byte ^ 1) - 1) >> 8) & 1
        first_one = is_one & (found ^ 1)
        separator = (separator & ~(-first_one)) | (i & -first_one)
        bad_padding |= (found ^ 1) & (is_zero ^ 1) & (is_one ^ 1)
        found |= is_one

    if not (label_ok & y_ok & found & (bad_padding ^ 1)):
        raise HsmAuthenticationFailed()
    return db[separator + 1:]
