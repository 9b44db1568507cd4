"""One node's HSM partition: a PKCS#11 token holding the cluster's domain keys.

Hazmat: only the service layer calls this module, never a request handler.
Every customer backing key is generated inside the token, wrapped under the
domain key (CKM_AES_KEY_WRAP_PAD) and handed out only in that wrapped form;
to use it, the wrapped blob is unwrapped into a non-extractable session
object, cached in a bounded LRU. Plaintext key material never leaves the
token, with one deliberate exception: random bytes that callers ask for
(data keys, GenerateRandom).

Domain-key generations: the token holds one AES-256 token object per live
generation, labelled `kmsd-domain-key` (generation 1, as every data dir made
before rotation existed) and `kmsd-domain-key-g<N>` for later ones. New blobs
are wrapped or sealed under the *active* generation, which the replicated
state decides (`generation_source`); every blob names its generation
(kmsd.domain_blob), so a blob of either generation of a rotation unwraps.
The handle caches are keyed by the whole blob, header included: a re-wrapped
blob is a new entry, and the old one keeps working until it is evicted.

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

from kmsd import domain_blob

# Generation 1's label; later generations append "-g<N>" (domain_key_label).
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


def domain_key_label(generation: int) -> str:
    if generation == domain_blob.FIRST_GENERATION:
        return DOMAIN_KEY_LABEL
    return f"{DOMAIN_KEY_LABEL}-g{generation}"


def label_generation(label: str) -> int | None:
    """The generation a token object's label names, or None if it is no domain key."""
    if label == DOMAIN_KEY_LABEL:
        return domain_blob.FIRST_GENERATION
    prefix = DOMAIN_KEY_LABEL + "-g"
    if label.startswith(prefix) and label[len(prefix):].isdigit():
        generation = int(label[len(prefix):])
        return generation if generation > domain_blob.FIRST_GENERATION else None
    return None


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
        self._domain_keys: dict[int, Any] = {}
        # The replicated state's active generation (the node sets it); None: newest held.
        self.generation_source: Callable[[], int] | None = None
        # Called with (call name, seconds, failed) after each timed token call; for metrics.
        self.observe: Callable[[str, float, bool], None] = lambda _c, _s, _f: None

    def _timed(self, call: str, started: float, failed: bool) -> None:
        self.observe(call, time.perf_counter() - started, failed)

    def close(self) -> None:
        for handle in self._handles.values():
            self._destroy(handle)
        self._handles.clear()
        self.session.close()

    # -- domain keys -----------------------------------------------------------

    @property
    def active_generation(self) -> int:
        """The generation new blobs are wrapped under: the replicated state's active one
        (set by the node through `generation_source`), else the newest this token holds."""
        if self.generation_source is not None:
            return self.generation_source()
        held = self.held_generations(with_check=False)
        return max(held) if held else domain_blob.FIRST_GENERATION

    @property
    def domain_key(self) -> Any:
        """The active generation's domain key."""
        return self.generation_key(self.active_generation)

    def generation_key(self, generation: int) -> Any:
        key = self._domain_keys.get(generation)
        if key is None:
            try:
                key = self.session.get_key(object_class=ObjectClass.SECRET_KEY,
                                           key_type=KeyType.AES,
                                           label=domain_key_label(generation))
            except pkcs11.NoSuchKey:
                raise NoDomainKey(f"token {self.token_label!r} holds no domain key of "
                                  f"generation {generation}") from None
            except pkcs11.MultipleObjectsReturned:
                raise HsmError(f"token {self.token_label!r} holds two domain keys of "
                               f"generation {generation}") from None
            self._domain_keys[generation] = key
        return key

    def forget_generation_handles(self) -> None:
        """Look the domain keys up again at next use (another process may have replaced one)."""
        self._domain_keys.clear()

    def held_generations(self, with_check: bool = True) -> dict[int, str]:
        """Generation -> check value ("" without with_check) of every domain key in the token."""
        held: dict[int, str] = {}
        # Listed first: a search in progress blocks other operations on the session.
        for obj in list(self.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})):
            try:
                generation = label_generation(str(obj[Attribute.LABEL]))
            except PKCS11Error:
                continue
            if generation is not None:
                held[generation] = self._check_value(obj) if with_check else ""
        return held

    def has_domain_key(self, generation: int | None = None) -> bool:
        if generation is None:
            return bool(self.held_generations(with_check=False))
        try:
            self.generation_key(generation)
        except NoDomainKey:
            return False
        return True

    def create_domain_key(self, generation: int = domain_blob.FIRST_GENERATION) -> str:
        """A new domain key of this generation in the token; returns its check value."""
        if self.has_domain_key(generation if generation > domain_blob.FIRST_GENERATION
                               else None):
            raise HsmError(f"token {self.token_label!r} already holds a domain key"
                           + (f" of generation {generation}"
                              if generation > domain_blob.FIRST_GENERATION else ""))
        key = self.session.generate_key(
            KeyType.AES, 256, label=domain_key_label(generation), store=True,
            capabilities=DOMAIN_KEY_CAPABILITIES, template=DOMAIN_KEY_TEMPLATE)
        self._domain_keys[generation] = key
        return self._check_value(key)

    def destroy_generation(self, generation: int) -> bool:
        """Destroy this generation's domain key in the token (and the handles it unwrapped).
        Returns whether there was one."""
        self._domain_keys.pop(generation, None)
        self.evict_generation(generation)
        found = list(self.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                               Attribute.LABEL: domain_key_label(generation)}))
        for obj in found:
            obj.destroy()
        return bool(found)

    def domain_key_check_value(self, generation: int | None = None) -> str:
        """A public fingerprint of a domain key (AES-CMAC of a constant), hex. Without a
        generation: the active one's."""
        return self._check_value(self.generation_key(
            self.active_generation if generation is None else generation))

    @staticmethod
    def _check_value(key: Any) -> str:
        mac = key.sign(_CHECK_VALUE_INPUT, mechanism=Mechanism.AES_CMAC)
        return bytes(mac[:8]).hex()

    # -- wrapping under a generation ------------------------------------------

    def wrap(self, key: Any) -> bytes:
        """`key` wrapped (CKM_AES_KEY_WRAP_PAD) under the active generation, tagged."""
        generation = self.active_generation
        wrapped = self.generation_key(generation).wrap_key(
            key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        return domain_blob.tag(generation, bytes(wrapped))

    def unwrap(self, blob: bytes, object_class: ObjectClass, key_type: KeyType,
               **kwargs: Any) -> Any:
        """A session object from a wrapped blob, under the generation the blob names.
        Raises PKCS11Error (or NoDomainKey) like python-pkcs11's unwrap_key."""
        generation, body = domain_blob.split_wrap(blob)
        try:
            return self.generation_key(generation).unwrap_key(
                object_class, key_type, body, store=False,
                mechanism=Mechanism.AES_KEY_WRAP_PAD, **kwargs)
        except PKCS11Error:
            # A handle can go stale when another process replaced that generation's key.
            self._domain_keys.pop(generation, None)
            return self.generation_key(generation).unwrap_key(
                object_class, key_type, body, store=False,
                mechanism=Mechanism.AES_KEY_WRAP_PAD, **kwargs)

    def rewrap(self, blob: bytes, object_class: ObjectClass, key_type: KeyType,
               template: dict[Attribute, Any] | None = None) -> bytes:
        """The same key material, wrapped under the active generation. The key exists
        unwrapped only as a session object inside the token, destroyed before returning."""
        try:
            key = self.unwrap(blob, object_class, key_type, capabilities=MechanismFlag(0),
                              template={**(template or {}), Attribute.SENSITIVE: True,
                                        Attribute.EXTRACTABLE: True})
        except PKCS11Error:
            raise HsmError("cannot unwrap the blob to re-wrap it") from None
        try:
            return self.wrap(key)
        except PKCS11Error:
            raise HsmError("cannot re-wrap the blob under the active domain key") from None
        finally:
            self._destroy(key)

    def evict_generation(self, generation: int) -> int:
        """Destroy cached handles of blobs wrapped under this generation."""
        stale = [blob for blob in self._handles
                 if domain_blob.wrap_generation(blob) == generation]
        for blob in stale:
            self.evict(blob)
        return len(stale)

    # -- backing keys --------------------------------------------------------

    def generate_wrapped_aes_key(self) -> bytes:
        """A new AES-256 backing key, generated in the token, returned only wrapped."""
        started = time.perf_counter()
        key = self.session.generate_key(
            KeyType.AES, 256, store=False,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
        try:
            return self.wrap(key)
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
            handle = self.unwrap(
                wrapped, ObjectClass.SECRET_KEY, KeyType.AES,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        except (PKCS11Error, NoDomainKey):
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
        """AES-GCM under the active domain key itself, for small secrets such as access keys;
        tagged with the generation (kmsd.domain_blob)."""
        generation = self.active_generation
        nonce = self.random(GCM_NONCE_BYTES)
        sealed = self.generation_key(generation).encrypt(
            plaintext, mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS))
        return domain_blob.tag(generation, nonce + bytes(sealed))

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        generation, body = domain_blob.split_seal(sealed)
        try:
            return self._open(generation, body, aad)
        except (HsmAuthenticationFailed, NoDomainKey):
            if generation == domain_blob.FIRST_GENERATION:
                raise HsmAuthenticationFailed() from None
        # A generation-1 blob whose nonce happens to begin with the tag (2**-64).
        try:
            return self._open(domain_blob.FIRST_GENERATION, sealed, aad)
        except NoDomainKey:
            raise HsmAuthenticationFailed() from None

    def _open(self, generation: int, body: bytes, aad: bytes) -> bytes:
        nonce, rest = body[:GCM_NONCE_BYTES], body[GCM_NONCE_BYTES:]
        try:
            return bytes(self.generation_key(generation).decrypt(
                rest, mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
        except PKCS11Error:
            raise HsmAuthenticationFailed() from None

    def reseal(self, sealed: bytes, aad: bytes) -> bytes:
        """The same secret sealed under the active generation. The plaintext exists only in
        this call's memory."""
        return self.seal(self.unseal(sealed, aad), aad)

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
