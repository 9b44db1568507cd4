"""Where each asymmetric, HMAC and key-agreement HSM call runs: inline or in the helper process.

Inline on the event loop is the measured choice for cheap token calls
(FACTS.md §P); calls that take tens of milliseconds to seconds go to the HSM
helper process (kmsd.hsm.worker_process) so that the loop keeps serving.
Measured on SoftHSM2 2.6.1 (kmsd.hsm.asymmetric's docstring):

| call                                   | time           | runs in        |
|----------------------------------------|----------------|----------------|
| RSA key generation (any size)          | 0.1-4.6 s      | helper process |
| RSA data key pair generation           | 0.1-4.6 s      | helper process |
| RSA-3072 / RSA-4096 sign and decrypt   | 3-40 ms        | helper process |
| RSA-2048 sign and decrypt              | ~0.8 ms        | inline         |
| EC / HMAC key generation, ECDSA, ECDH, HMAC, EC data key pairs | <= ~2 ms | inline |

Public-key halves (Verify, RSA Encrypt) run on the host with `cryptography`
and never touch the token (kmsd.hsm.asymmetric.verify/encrypt).

The helper process unwraps keys into its own handle cache; `prune` clears the handles of
deleted keys in both.
Without a helper process (tests of the service layer, tools) everything runs inline.
"""

from __future__ import annotations

from kmsd.hsm.asymmetric import AsymmetricKeys, GeneratedKey, MessageType
from kmsd.hsm.capabilities import RSA_KEY_SPECS, TokenCapabilities
from kmsd.hsm.data_key_pairs import DataKeyPair, generate_data_key_pair
from kmsd.hsm.worker_process import HsmWorkerProcess

GENERATE = "generate"
SIGN = "sign"
DECRYPT = "decrypt"
DATA_KEY_PAIR = "data_key_pair"
# RSA private-key operations at or above this modulus size leave the loop (RSA-2048: ~0.8 ms).
SLOW_RSA_BITS = 3072


def runs_in_worker(call: str, key_spec: str) -> bool:
    """True if this call on this key spec is slow enough to leave the event loop."""
    if key_spec not in RSA_KEY_SPECS:
        return False
    if call in (GENERATE, DATA_KEY_PAIR):
        return True
    if call in (SIGN, DECRYPT):
        return RSA_KEY_SPECS[key_spec] >= SLOW_RSA_BITS
    return False


class AsymmetricRouter:
    """The async face of the token's asymmetric operations for the service layer."""

    def __init__(self, inline: AsymmetricKeys, worker: HsmWorkerProcess | None = None) -> None:
        self.inline = inline
        self.worker = worker
        # Blobs this router had unwrapped, inline or in the helper process, for `prune`.
        self._inline_blobs: set[bytes] = set()
        self._worker_blobs: set[bytes] = set()

    @property
    def capabilities(self) -> TokenCapabilities:
        return self.inline.capabilities

    @property
    def token_label(self) -> str:
        return self.inline.partition.token_label

    def _offload(self, call: str, key_spec: str) -> HsmWorkerProcess | None:
        return self.worker if self.worker is not None and runs_in_worker(call, key_spec) else None

    async def generate(self, key_spec: str) -> GeneratedKey:
        worker = self._offload(GENERATE, key_spec)
        if worker is not None:
            return await worker.generate(key_spec)
        return self.inline.generate(key_spec)

    async def sign(self, wrapped: bytes, key_spec: str, algorithm: str, message: bytes,
                   message_type: MessageType) -> bytes:
        worker = self._offload(SIGN, key_spec)
        self._used(wrapped, worker)
        if worker is not None:
            return await worker.sign(wrapped, key_spec, algorithm, message, message_type)
        return self.inline.sign(wrapped, key_spec, algorithm, message, message_type)

    async def decrypt(self, wrapped: bytes, key_spec: str, algorithm: str,
                      ciphertext: bytes) -> bytes:
        worker = self._offload(DECRYPT, key_spec)
        self._used(wrapped, worker)
        if worker is not None:
            return await worker.decrypt(wrapped, key_spec, algorithm, ciphertext)
        return self.inline.decrypt(wrapped, key_spec, algorithm, ciphertext)

    async def data_key_pair(self, key_pair_spec: str) -> DataKeyPair:
        worker = self._offload(DATA_KEY_PAIR, key_pair_spec)
        if worker is not None:
            return await worker.data_key_pair(key_pair_spec)
        return generate_data_key_pair(self.inline.partition, key_pair_spec)

    def derive_shared_secret(self, wrapped: bytes, key_spec: str, peer_public_key_der: bytes,
                             algorithm: str) -> bytes:
        self._used(wrapped, None)
        return self.inline.derive_shared_secret(wrapped, key_spec, peer_public_key_der,
                                                algorithm)

    def generate_mac(self, wrapped: bytes, key_spec: str, algorithm: str,
                     message: bytes) -> bytes:
        self._used(wrapped, None)
        return self.inline.generate_mac(wrapped, key_spec, algorithm, message)

    def verify_mac(self, wrapped: bytes, key_spec: str, algorithm: str, message: bytes,
                   mac: bytes) -> bool:
        self._used(wrapped, None)
        return self.inline.verify_mac(wrapped, key_spec, algorithm, message, mac)

    def _used(self, wrapped: bytes, worker: HsmWorkerProcess | None) -> None:
        (self._worker_blobs if worker is not None else self._inline_blobs).add(wrapped)

    def tracks_any(self) -> bool:
        return bool(self._inline_blobs or self._worker_blobs)

    async def evict(self, blobs: tuple[bytes, ...]) -> None:
        """Destroy the cached handles of these blobs here and in the helper process at once
        (imported material deleted), without waiting for the next `prune`."""
        in_worker = tuple(b for b in blobs if b in self._worker_blobs)
        for blob in blobs:
            if blob in self._inline_blobs:
                self.inline.evict(blob)
                self._inline_blobs.discard(blob)
        if in_worker and self.worker is not None:
            await self.worker.evict(in_worker)
        self._worker_blobs.difference_update(in_worker)

    async def prune(self, live: set[bytes]) -> int:
        """Destroy cached handles of blobs no longer in `live` (keys deleted from the
        cluster), here and in the helper process. Returns how many blobs were dropped."""
        dead_inline = self._inline_blobs - live
        dead_worker = self._worker_blobs - live
        for blob in dead_inline:
            self.inline.evict(blob)
        self._inline_blobs -= dead_inline
        if dead_worker and self.worker is not None:
            await self.worker.evict(tuple(dead_worker))
        self._worker_blobs -= dead_worker
        return len(dead_inline | dead_worker)
