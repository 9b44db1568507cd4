"""One node's HSM partition: a PKCS#11 token holding the cluster's domain key.

Hazmat: only the service layer calls this module, never a request handler.
Every customer backing key is generated inside the token, wrapped under the
domain key (CKM_AES_KEY_WRAP_PAD) and handed out only in that wrapped form;
to use it, the wrapped blob is unwrapped into a non-extractable session
object, cached in a bounded LRU. Plaintext key material never leaves the
token, with one deliberate exception: random bytes that callers ask for
(data keys, GenerateRandom).

PKCS#11 through python-pkcs11 on SoftHSM2 is not thread-safe (FACTS.md
§0.1): a partition is used from one thread only, the event loop's. AES-GCM
calls take ~25-40 µs, so they run inline, which measured faster than any
hand-off to a thread (FACTS.md §P). The process logs in once and keeps that
session open for its lifetime.

Never logs, returns or raises with plaintext or key material in it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

DOMAIN_KEY_LABEL = "kmsd-domain-key"
# What the domain-key check value is a MAC of; changing it changes every check value.
_CHECK_VALUE_INPUT = b"kmsd domain key check value v1\x00\x00"
GCM_NONCE_BYTES = 12
GCM_TAG_BITS = 128

DOMAIN_KEY_CAPABILITIES = (MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.ENCRYPT
                           | MechanismFlag.DECRYPT | MechanismFlag.SIGN)
DOMAIN_KEY_TEMPLATE = {Attribute.SENSITIVE: True, Attribute.PRIVATE: True,
                       # Extractable only so that it can be wrapped to a joining node's HSM.
                       Attribute.EXTRACTABLE: True}


class HsmError(Exception):
    """The token failed or refused an operation (not an authentication failure)."""


class HsmAuthenticationFailed(Exception):
    """A ciphertext or wrapped blob did not authenticate. Deliberately carries no detail."""


class NoDomainKey(HsmError):
    pass


_LIBRARIES: dict[str, Any] = {}


def load_library(module_path: str) -> Any:
    """The process-wide PKCS#11 library: C_Initialize runs once per process."""
    lib = _LIBRARIES.get(module_path)
    if lib is None:
        lib = _LIBRARIES[module_path] = pkcs11.lib(module_path)
    return lib


class HsmPartition:
    def __init__(self, module_path: str, token_label: str, pin: str,
                 handle_cache_size: int = 4096) -> None:
        self.module_path = module_path
        self.token_label = token_label
        lib = load_library(module_path)
        try:
            self.token = lib.get_token(token_label=token_label)
            self.session = self.token.open(user_pin=pin, rw=True)
        except PKCS11Error as exc:
            raise HsmError(f"cannot open token {token_label!r}: {type(exc).__name__}") from None
        self._handles: OrderedDict[bytes, Any] = OrderedDict()
        self._handle_cache_size = handle_cache_size
        self.handle_cache_hits = 0
        self.handle_cache_misses = 0
        self._domain_key: Any | None = None
        # Called with (call name, seconds, failed) after each timed token call; for metrics.
        self.observe: Callable[[str, float, bool], None] = lambda _c, _s, _f: None

    def _timed(self, call: str, started: float, failed: bool) -> None:
        self.observe(call, time.perf_counter() - started, failed)

    def close(self) -> None:
        for handle in self._handles.values():
            self._destroy(handle)
        self._handles.clear()
        self.session.close()

    # -- domain key ----------------------------------------------------------

    @property
    def domain_key(self) -> Any:
        if self._domain_key is None:
            try:
                self._domain_key = self.session.get_key(
                    object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                    label=DOMAIN_KEY_LABEL)
            except pkcs11.NoSuchKey:
                raise NoDomainKey(f"token {self.token_label!r} holds no domain key") from None
        return self._domain_key

    def has_domain_key(self) -> bool:
        try:
            _ = self.domain_key
        except NoDomainKey:
            return False
        return True

    def create_domain_key(self) -> None:
        if self.has_domain_key():
            raise HsmError(f"token {self.token_label!r} already holds a domain key")
        self._domain_key = self.session.generate_key(
            KeyType.AES, 256, label=DOMAIN_KEY_LABEL, store=True,
            capabilities=DOMAIN_KEY_CAPABILITIES, template=DOMAIN_KEY_TEMPLATE)

    def domain_key_check_value(self) -> str:
        """A public fingerprint of the domain key (AES-CMAC of a constant), hex."""
        mac = self.domain_key.sign(_CHECK_VALUE_INPUT, mechanism=Mechanism.AES_CMAC)
        return bytes(mac[:8]).hex()

    # -- backing keys --------------------------------------------------------

    def generate_wrapped_aes_key(self) -> bytes:
        """A new AES-256 backing key, generated in the token, returned only wrapped."""
        started = time.perf_counter()
        key = self.session.generate_key(
            KeyType.AES, 256, store=False,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
        try:
            return bytes(self.domain_key.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            self._destroy(key)
            self._timed("generate_key", started, False)

    def _aes_handle(self, wrapped: bytes) -> Any:
        handle = self._handles.get(wrapped)
        if handle is not None:
            self._handles.move_to_end(wrapped)
            self.handle_cache_hits += 1
            return handle
        self.handle_cache_misses += 1
        started = time.perf_counter()
        try:
            handle = self.domain_key.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped, store=False,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        except PKCS11Error:
            self._timed("unwrap", started, True)
            raise HsmError("cannot unwrap backing key under this token's domain key") from None
        self._timed("unwrap", started, False)
        self._handles[wrapped] = handle
        if len(self._handles) > self._handle_cache_size:
            _, evicted = self._handles.popitem(last=False)
            self._destroy(evicted)
        return handle

    @property
    def cached_handles(self) -> int:
        return len(self._handles)

    def evict(self, wrapped: bytes) -> None:
        handle = self._handles.pop(wrapped, None)
        if handle is not None:
            self._destroy(handle)

    def encrypt_gcm(self, wrapped_key: bytes, nonce: bytes, aad: bytes,
                    plaintext: bytes) -> bytes:
        """AES-256-GCM under an unwrapped backing key; returns ciphertext || tag."""
        key = self._aes_handle(wrapped_key)
        started = time.perf_counter()
        try:
            sealed = bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                       mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
        except PKCS11Error:
            self._timed("encrypt", started, True)
            raise HsmError("AES-GCM encryption failed") from None
        self._timed("encrypt", started, False)
        return sealed

    def decrypt_gcm(self, wrapped_key: bytes, nonce: bytes, aad: bytes,
                    ciphertext_and_tag: bytes) -> bytes:
        key = self._aes_handle(wrapped_key)
        started = time.perf_counter()
        try:
            plaintext = bytes(key.decrypt(ciphertext_and_tag, mechanism=Mechanism.AES_GCM,
                                          mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
        except PKCS11Error:
            # SoftHSM2 answers a failed tag check with a GeneralError; every cause is one answer.
            self._timed("decrypt", started, False)
            raise HsmAuthenticationFailed() from None
        self._timed("decrypt", started, False)
        return plaintext

    # -- secrets sealed under the domain key ----------------------------------

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM under the domain key itself, for small secrets such as access keys."""
        nonce = self.random(GCM_NONCE_BYTES)
        sealed = self.domain_key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS))
        return nonce + bytes(sealed)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        nonce, body = sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:]
        try:
            return bytes(self.domain_key.decrypt(
                body, mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
        except PKCS11Error:
            raise HsmAuthenticationFailed() from None

    # -- randomness ----------------------------------------------------------

    def random(self, length: int) -> bytes:
        if length <= 0:
            return b""
        return bytes(self.session.generate_random(length * 8))

    @staticmethod
    def _destroy(handle: Any) -> None:
        with contextlib.suppress(PKCS11Error):
            handle.destroy()


def softhsm_module_path() -> str:
    for candidate in ("/usr/lib/softhsm/libsofthsm2.so",
                      "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                      "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                      "/usr/local/lib/softhsm/libsofthsm2.so"):
        if os.path.exists(candidate):
            return candidate
    return "/usr/lib/softhsm/libsofthsm2.so"
