"""HSM operations behind KMS asymmetric, HMAC and key-agreement keys.

Hazmat: only the service layer calls this module. It owns, per KMS KeySpec,
key generation in the token; Sign (RSASSA-PSS, RSASSA-PKCS1-v1_5, ECDSA,
Ed25519); RSAES-OAEP Decrypt; ECDH DeriveSharedSecret; HMAC GenerateMac and
VerifyMac -- and, on the host with `cryptography`, the public-key halves:
`verify` and `encrypt` (cheaper than the token, FACTS.md §C.6).

Private and secret key material is generated inside the token and leaves it
only wrapped under the domain key (CKM_AES_KEY_WRAP_PAD). To use a key, the
wrapped blob is unwrapped into a sensitive, non-extractable session object,
kept in a bounded LRU keyed by the blob (evicted objects are destroyed). The
one deliberate plaintext output is the ECDH shared secret, which KMS
DeriveSharedSecret returns to the caller.

How each KeySpec/algorithm is carried out on this token comes from
`kmsd.hsm.capabilities.probe` (in-token, raw RSA in the token + OAEP decoding
on the host, host hash + in-token ECDSA, or unsupported). Anything the token
cannot do raises `UnsupportedByToken`, naming the token and the algorithm.

Never logs, and never puts into an exception, key material, plaintext,
messages, digests, MACs or signatures. Not thread-safe (FACTS.md §0.1): use an
instance from the one thread that owns the partition. Every method is
synchronous and touches nothing but the token.

Slow calls -- route these off the event loop. Measured on the 2-vCPU dev
machine (load average ~2), SoftHSM2 2.6.1, one thread, two runs; median
[min-max]:
- generate("RSA_2048") ~0.45 s [0.12-1.24 s]; "RSA_3072" ~1.0-1.3 s
  [0.35-3.5 s]; "RSA_4096" ~1.5-1.75 s [0.76-4.6 s]. The prime search makes
  the duration random with a long tail: pre-generate RSA keys off the request
  path. EC keys take ~1-2 ms and HMAC keys ~0.2 ms; those can run inline.
- sign / decrypt with RSA_4096: ~8-14 ms [5.7-41 ms]; RSA_3072: ~3-5 ms;
  RSA_2048: ~0.8 ms. Both decryption paths cost the same: the host OAEP
  decoding adds ~0.1 ms.
- the first use of a wrapped key, which unwraps it into the handle cache:
  RSA ~1-3 ms, EC ~1-5 ms, with outliers up to ~25 ms. After that the handle
  is cached. A burst of uncached keys is an unwrap storm.
- AsymmetricKeys() without capabilities runs probe(): ~35-130 ms, once.
Cheap (<= ~2 ms) and fine inline: ECDSA sign P-256 ~0.15 ms, P-384 ~2 ms,
P-521 ~0.8 ms, secp256k1 ~0.9 ms; ECDH ~0.5-2 ms; HMAC ~0.03 ms; host
`verify` ~0.04-0.9 ms; host `encrypt` well under 1 ms.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import KDF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from kmsd.hsm import oaep
from kmsd.hsm.capabilities import (
    ALGORITHM_HASH,
    CRYPTOGRAPHY_HASH,
    EC_KEY_SPECS,
    ED25519_EC_PARAMS,
    ED25519_EC_PARAMS_NAMED,
    ED25519_KEY_SPEC,
    ED25519_PH_SHA_512,
    ED25519_SHA_512,
    ENCRYPTION_ALGORITHMS,
    HASH_MECHANISM,
    HMAC_KEY_SPECS,
    HMAC_MECHANISM,
    IN_TOKEN,
    KEY_AGREEMENT_ALGORITHMS,
    KEY_SPECS,
    MAC_ALGORITHMS,
    MGF_FOR_HASH,
    PKCS1_MECHANISM,
    PRIVATE_UNWRAP_FIX,
    PSS_MECHANISM,
    RAW_IN_TOKEN_HOST_DECODING,
    RSA_KEY_SPECS,
    RSASSA_PSS,
    SIGNING_ALGORITHMS,
    UNSUPPORTED,
    TokenCapabilities,
    ed25519_public_bytes,
    probe,
)
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition, NoDomainKey

MessageType = Literal["RAW", "DIGEST"]
RAW: MessageType = "RAW"
DIGEST: MessageType = "DIGEST"
# KMS's limit on a RAW message for Sign/Verify, and on a GenerateMac message. The caller
# (the service layer) enforces it; this module signs whatever it is given.
MAX_RAW_MESSAGE_BYTES = 4096

# For MessageType DIGEST, the digest must be exactly this long.
DIGEST_LENGTHS: dict[str, int] = {
    algorithm: hashlib.new(ALGORITHM_HASH[algorithm]).digest_size
    for specs in SIGNING_ALGORITHMS.values() for algorithm in specs
    if algorithm in ALGORITHM_HASH and algorithm != ED25519_SHA_512}

# RFC 8017 §9.2 note 1: DER DigestInfo prefixes for EMSA-PKCS1-v1_5 over a ready digest.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# RFC 8410 SubjectPublicKeyInfo for Ed25519: this prefix, then the 32-byte public key.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_SENSITIVE_UNWRAP = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}


class UnsupportedByToken(Exception):
    """This token (named in the message) cannot do this key spec or algorithm."""


class InvalidInput(Exception):
    """The request does not fit the key: wrong algorithm for the key spec, wrong digest
    length, a peer key on another curve, a plaintext too long... No key material inside."""


@dataclass(frozen=True)
class GeneratedKey:
    key_spec: str
    wrapped_private: bytes          # KWP under the domain key: PKCS#8 (asymmetric) or raw (HMAC)
    public_key_der: bytes | None    # DER SubjectPublicKeyInfo; None for HMAC keys


# -- host side: public-key operations ------------------------------------------

def _load_public_key(public_key_der: bytes) -> Any:
    try:
        return load_der_public_key(public_key_der)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput("public key is not a DER SubjectPublicKeyInfo kmsd can read") from None


def public_key_spec(public_key: Any) -> str:
    """The KMS KeySpec of a `cryptography` public key (InvalidInput if it has none)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        for spec, bits in RSA_KEY_SPECS.items():
            if public_key.key_size == bits:
                return spec
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        for spec, curve in EC_KEY_SPECS.items():
            if public_key.curve.name == curve:
                return spec
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        return ED25519_KEY_SPEC
    raise InvalidInput("public key matches no KMS key spec")


def _check_signing(key_spec: str, signing_algorithm: str, message: bytes,
                   message_type: str) -> None:
    if signing_algorithm not in SIGNING_ALGORITHMS.get(key_spec, ()):
        raise InvalidInput(f"signing algorithm {signing_algorithm} is not valid for "
                           f"key spec {key_spec}")
    if message_type not in (RAW, DIGEST):
        raise InvalidInput(f"message type must be RAW or DIGEST, not {message_type!r}")
    if message_type == DIGEST:
        if signing_algorithm == ED25519_SHA_512:
            raise InvalidInput("ED25519_SHA_512 signs RAW messages only")
        expected = DIGEST_LENGTHS[signing_algorithm]
        if len(message) != expected:
            raise InvalidInput(f"{signing_algorithm} needs a {expected}-byte digest, "
                               f"got {len(message)} bytes")


def verify(public_key_der: bytes, signing_algorithm: str, message: bytes,
           message_type: MessageType, signature: bytes) -> bool:
    """Verify a signature on the host. False for any bad signature; no detail why.

    InvalidInput only for requests that are wrong whatever the signature is (an
    unreadable public key, an algorithm the key cannot use, a digest of the wrong length).
    """
    public_key = _load_public_key(public_key_der)
    key_spec = public_key_spec(public_key)
    _check_signing(key_spec, signing_algorithm, message, message_type)
    if signing_algorithm == ED25519_PH_SHA_512:
        raise UnsupportedByToken("host verifier (cryptography) cannot verify "
                                 "ED25519_PH_SHA_512: it has no Ed25519ph")
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
            return True
        hash_name = ALGORITHM_HASH[signing_algorithm]
        h = CRYPTOGRAPHY_HASH[hash_name]()
        chosen: Any = Prehashed(h) if message_type == DIGEST else h
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(chosen))
        elif signing_algorithm in RSASSA_PSS:
            public_key.verify(signature, message,
                              padding.PSS(padding.MGF1(h), h.digest_size), chosen)
        else:
            public_key.verify(signature, message, padding.PKCS1v15(), chosen)
    except (InvalidSignature, ValueError):
        # ValueError: a malformed signature (e.g. not DER for ECDSA) is just a bad signature.
        return False
    return True


def max_plaintext_length(key_spec: str, encryption_algorithm: str) -> int:
    """The longest plaintext RSAES-OAEP can encrypt: k - 2*hLen - 2 (RFC 8017 §7.1.1)."""
    if encryption_algorithm not in ENCRYPTION_ALGORITHMS.get(key_spec, ()) \
            or key_spec not in RSA_KEY_SPECS:
        raise InvalidInput(f"encryption algorithm {encryption_algorithm} is not valid for "
                           f"key spec {key_spec}")
    h_len = hashlib.new(ALGORITHM_HASH[encryption_algorithm]).digest_size
    return RSA_KEY_SPECS[key_spec] // 8 - 2 * h_len - 2


def encrypt(public_key_der: bytes, encryption_algorithm: str, plaintext: bytes) -> bytes:
    """RSAES-OAEP encryption on the host with the public key (KMS Encrypt for RSA keys)."""
    public_key = _load_public_key(public_key_der)
    key_spec = public_key_spec(public_key)
    limit = max_plaintext_length(key_spec, encryption_algorithm)
    if len(plaintext) > limit:
        raise InvalidInput(f"{encryption_algorithm} with {key_spec} encrypts at most "
                           f"{limit} bytes, got {len(plaintext)}")
    h = CRYPTOGRAPHY_HASH[ALGORITHM_HASH[encryption_algorithm]]
    return bytes(public_key.encrypt(plaintext, padding.OAEP(padding.MGF1(h()), h(), None)))


def ed25519_spki(ec_point: bytes) -> bytes:
    """DER SubjectPublicKeyInfo (RFC 8410) of an Ed25519 key from its CKA_EC_POINT."""
    return _ED25519_SPKI_PREFIX + ed25519_public_bytes(ec_point)


def rsa_spki(public: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a token RSA public key (python-pkcs11 gives PKCS#1)."""
    numbers = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                   int.from_bytes(public[Attribute.MODULUS], "big"))
    return numbers.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


# -- token side: signing primitives on an unwrapped handle --------------------

def _sign_rsa(handle: Any, signing_algorithm: str, message: bytes, message_type: str) -> bytes:
    hash_name = ALGORITHM_HASH[signing_algorithm]
    if signing_algorithm in RSASSA_PSS:
        # Explicit parameters: python-pkcs11 defaults to SHA-1/MGF1-SHA1/salt 20 (FACTS §C.1).
        params = (HASH_MECHANISM[hash_name], MGF_FOR_HASH[hash_name],
                  hashlib.new(hash_name).digest_size)
        mechanism = PSS_MECHANISM[hash_name] if message_type == RAW else Mechanism.RSA_PKCS_PSS
        return bytes(handle.sign(message, mechanism=mechanism, mechanism_param=params))
    if message_type == RAW:
        return bytes(handle.sign(message, mechanism=PKCS1_MECHANISM[hash_name]))
    return bytes(handle.sign(_DIGEST_INFO_PREFIX[hash_name] + message,
                             mechanism=Mechanism.RSA_PKCS))


def _sign_ecdsa(handle: Any, signing_algorithm: str, message: bytes, message_type: str) -> bytes:
    hash_name = ALGORITHM_HASH[signing_algorithm]
    digest = hashlib.new(hash_name, message).digest() if message_type == RAW else message
    # Raw CKM_ECDSA gives r || s; KMS returns the DER ECDSA-Sig-Value.
    return encode_ecdsa_signature(bytes(handle.sign(digest, mechanism=Mechanism.ECDSA)))


def _sign_eddsa(handle: Any, message: bytes) -> bytes:
    """Pure Ed25519 (RFC 8032) over the whole message; 64 bytes."""
    return bytes(handle.sign(message, mechanism=Mechanism.EDDSA))


# -- the partition-bound operations ---------------------------------------------

class AsymmetricKeys:
    """Asymmetric, HMAC and ECDH operations on one partition's token.

    `capabilities` defaults to probing the token now (~35 ms on SoftHSM2).
    """

    def __init__(self, partition: HsmPartition, capabilities: TokenCapabilities | None = None,
                 handle_cache_size: int = 1024) -> None:
        self.partition = partition
        self.capabilities = capabilities if capabilities is not None else probe(partition)
        self._handles: OrderedDict[bytes, tuple[str, Any]] = OrderedDict()
        self._handle_cache_size = max(1, handle_cache_size)
        self.handle_cache_hits = 0
        self.handle_cache_misses = 0

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        for _, handle in self._handles.values():
            _destroy(handle)
        self._handles.clear()

    def evict(self, wrapped: bytes) -> None:
        entry = self._handles.pop(wrapped, None)
        if entry is not None:
            _destroy(entry[1])

    @property
    def cached_handles(self) -> int:
        return len(self._handles)

    # -- checks ----------------------------------------------------------------

    def _require(self, name: str) -> str:
        """The path for a key spec or algorithm, or UnsupportedByToken naming the token."""
        try:
            entry = self.capabilities.entry(name)
        except KeyError:
            raise InvalidInput(f"unknown key spec or algorithm {name!r}") from None
        if entry.path == UNSUPPORTED:
            raise UnsupportedByToken(f"token {self.partition.token_label!r} cannot do {name}: "
                                     f"{entry.detail}")
        return entry.path

    # -- key generation --------------------------------------------------------

    def generate(self, key_spec: str) -> GeneratedKey:
        """A new key pair or HMAC key made in the token; private/secret part returned wrapped.

        Slow for RSA (seconds; see the module docstring).
        """
        if key_spec not in KEY_SPECS:
            raise InvalidInput(f"unknown key spec {key_spec!r}")
        self._require(key_spec)
        session = self.partition.session
        objects: list[Any] = []
        try:
            if key_spec in HMAC_KEY_SPECS:
                secret = session.generate_key(
                    KeyType.GENERIC_SECRET, HMAC_KEY_SPECS[key_spec], store=False,
                    capabilities=MechanismFlag.SIGN,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
                objects.append(secret)
                return GeneratedKey(key_spec, self.partition.wrap(secret), None)
            private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
            if key_spec in RSA_KEY_SPECS:
                public, private = session.generate_keypair(
                    KeyType.RSA, RSA_KEY_SPECS[key_spec], store=False,
                    private_template=private_template)
                objects += [public, private]
                spki = rsa_spki(public)
            else:
                if key_spec in EC_KEY_SPECS:
                    key_type, mechanism = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN
                    ec_params = encode_named_curve_parameters(EC_KEY_SPECS[key_spec])
                else:
                    key_type, mechanism = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
                    ec_params = ED25519_EC_PARAMS
                params = session.create_domain_parameters(
                    key_type, {Attribute.EC_PARAMS: ec_params}, local=True)
                public, private = params.generate_keypair(
                    store=False, mechanism=mechanism, private_template=private_template)
                objects += [public, private]
                spki = (encode_ec_public_key(public) if key_type == KeyType.EC
                        else ed25519_spki(bytes(public[Attribute.EC_POINT])))
            return GeneratedKey(key_spec, self.partition.wrap(private), spki)
        except PKCS11Error as exc:
            raise HsmError(f"token {self.partition.token_label!r} failed to generate a "
                           f"{key_spec} key ({type(exc).__name__})") from None
        finally:
            for obj in objects:
                _destroy(obj)

    # -- unwrapping --------------------------------------------------------------

    def _handle(self, wrapped: bytes, key_spec: str) -> Any:
        """The non-extractable session object for a wrapped key (LRU-cached by blob)."""
        entry = self._handles.get(wrapped)
        if entry is not None:
            if entry[0] != key_spec:
                raise InvalidInput(f"wrapped key is not a {key_spec} key")
            self._handles.move_to_end(wrapped)
            self.handle_cache_hits += 1
            return entry[1]
        self.handle_cache_misses += 1
        handle = self._unwrap(wrapped, key_spec)
        try:
            self._check_unwrapped(handle, key_spec)
        except BaseException:
            _destroy(handle)
            raise
        self._handles[wrapped] = (key_spec, handle)
        while len(self._handles) > self._handle_cache_size:
            _, (_, evicted) = self._handles.popitem(last=False)
            _destroy(evicted)
        return handle

    def _unwrap(self, wrapped: bytes, key_spec: str) -> Any:
        if key_spec in HMAC_KEY_SPECS:
            object_class, key_type = ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET
            capabilities, template = MechanismFlag.SIGN, dict(_SENSITIVE_UNWRAP)
        else:
            object_class = ObjectClass.PRIVATE_KEY
            template = {**PRIVATE_UNWRAP_FIX, **_SENSITIVE_UNWRAP}
            if key_spec in RSA_KEY_SPECS:
                key_type, capabilities = KeyType.RSA, MechanismFlag.SIGN | MechanismFlag.DECRYPT
            elif key_spec in EC_KEY_SPECS:
                key_type, capabilities = KeyType.EC, MechanismFlag.SIGN | MechanismFlag.DERIVE
            else:
                key_type, capabilities = KeyType.EC_EDWARDS, MechanismFlag.SIGN
        try:
            return self.partition.unwrap(wrapped, object_class, key_type,
                                         capabilities=capabilities, template=template)
        except (PKCS11Error, NoDomainKey):
            raise HsmError(f"cannot unwrap a {key_spec} key under this token's "
                           f"domain key") from None

    @staticmethod
    def _check_unwrapped(handle: Any, key_spec: str) -> None:
        """A blob of another key type unwraps fine into the wrong shape; catch that here."""
        try:
            if key_spec in RSA_KEY_SPECS:
                ok = len(handle[Attribute.MODULUS]) * 8 == RSA_KEY_SPECS[key_spec]
            elif key_spec in EC_KEY_SPECS:
                expected = encode_named_curve_parameters(EC_KEY_SPECS[key_spec])
                ok = bytes(handle[Attribute.EC_PARAMS]) == expected
            elif key_spec == ED25519_KEY_SPEC:
                ok = bytes(handle[Attribute.EC_PARAMS]) in (ED25519_EC_PARAMS,
                                                             ED25519_EC_PARAMS_NAMED)
            else:
                ok = True  # SoftHSM2 leaves CKA_VALUE_LEN 0 on unwrapped secrets: nothing to read
        except PKCS11Error:
            ok = False
        if not ok:
            raise InvalidInput(f"wrapped key is not a {key_spec} key")

    # -- Sign ----------------------------------------------------------------------

    def sign(self, wrapped_private: bytes, key_spec: str, signing_algorithm: str,
             message: bytes, message_type: MessageType) -> bytes:
        """KMS Sign. RSA: raw signature bytes; ECDSA: DER; Ed25519: 64 bytes.

        DIGEST messages must be exactly `DIGEST_LENGTHS[signing_algorithm]` bytes.
        """
        if signing_algorithm not in SIGNING_ALGORITHMS.get(key_spec, ()):
            raise InvalidInput(f"signing algorithm {signing_algorithm} is not valid for "
                               f"key spec {key_spec}")
        self._require(key_spec)
        self._require(signing_algorithm)
        if signing_algorithm == ED25519_PH_SHA_512:
            # Even if an operator forces the path: kmsd cannot check an Ed25519ph signature.
            raise UnsupportedByToken(f"token {self.partition.token_label!r}: kmsd does not "
                                     f"implement {signing_algorithm}")
        _check_signing(key_spec, signing_algorithm, message, message_type)
        handle = self._handle(wrapped_private, key_spec)
        try:
            if key_spec in RSA_KEY_SPECS:
                return _sign_rsa(handle, signing_algorithm, message, message_type)
            if key_spec in EC_KEY_SPECS:
                return _sign_ecdsa(handle, signing_algorithm, message, message_type)
            return _sign_eddsa(handle, message)
        except PKCS11Error as exc:
            raise HsmError(f"token {self.partition.token_label!r} failed to sign with "
                           f"{signing_algorithm} ({type(exc).__name__})") from None

    # -- Decrypt -------------------------------------------------------------------

    def decrypt(self, wrapped_private: bytes, key_spec: str, encryption_algorithm: str,
                ciphertext: bytes) -> bytes:
        """KMS Decrypt with an RSA key. Every decryption failure is one
        `HsmAuthenticationFailed()` with no detail, whatever the cause."""
        if encryption_algorithm not in ENCRYPTION_ALGORITHMS.get(key_spec, ()):
            raise InvalidInput(f"encryption algorithm {encryption_algorithm} is not valid for "
                               f"key spec {key_spec}")
        self._require(key_spec)
        path = self._require(encryption_algorithm)
        handle = self._handle(wrapped_private, key_spec)
        k = RSA_KEY_SPECS[key_spec] // 8
        hash_name = ALGORITHM_HASH[encryption_algorithm]
        if len(ciphertext) != k:
            raise HsmAuthenticationFailed()
        if path == IN_TOKEN:
            try:
                return bytes(handle.decrypt(
                    ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(HASH_MECHANISM[hash_name], MGF_FOR_HASH[hash_name], None)))
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        if path != RAW_IN_TOKEN_HOST_DECODING:
            raise UnsupportedByToken(f"token {self.partition.token_label!r} has no path "
                                     f"{path!r} for {encryption_algorithm}")
        try:
            encoded = bytes(handle.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
        except PKCS11Error:
            # The ciphertext is not below the modulus: public information, same answer.
            raise HsmAuthenticationFailed() from None
        return oaep.decode(encoded.rjust(k, b"\x00"), hash_name)

    # -- DeriveSharedSecret ----------------------------------------------------------

    def derive_shared_secret(self, wrapped_private: bytes, key_spec: str,
                             peer_public_key_der: bytes,
                             key_agreement_algorithm: str = "ECDH") -> bytes:
        """KMS DeriveSharedSecret: the raw ECDH shared secret Z (x-coordinate, field size)."""
        if key_agreement_algorithm not in KEY_AGREEMENT_ALGORITHMS.get(key_spec, ()):
            raise InvalidInput(f"key agreement algorithm {key_agreement_algorithm} is not "
                               f"valid for key spec {key_spec}")
        self._require(key_spec)
        self._require(key_agreement_algorithm)
        curve_name = EC_KEY_SPECS[key_spec]
        peer = _load_public_key(peer_public_key_der)
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise InvalidInput(f"peer public key is not an EC key; {key_spec} needs a "
                               f"{curve_name} key")
        if peer.curve.name != curve_name:
            raise InvalidInput(f"peer public key is on {peer.curve.name}; {key_spec} needs "
                               f"a {curve_name} key")
        peer_point = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        handle = self._handle(wrapped_private, key_spec)
        length = (peer.curve.key_size + 7) // 8
        try:
            secret = handle.derive_key(
                KeyType.GENERIC_SECRET, length * 8, store=False,
                mechanism=Mechanism.ECDH1_DERIVE, mechanism_param=(KDF.NULL, None, peer_point),
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        except PKCS11Error as exc:
            raise HsmError(f"token {self.partition.token_label!r} failed ECDH on "
                           f"{curve_name} ({type(exc).__name__})") from None
        try:
            return bytes(secret[Attribute.VALUE])
        finally:
            _destroy(secret)

    # -- GenerateMac / VerifyMac -----------------------------------------------------

    def _mac(self, wrapped_key: bytes, key_spec: str, mac_algorithm: str,
             message: bytes) -> bytes:
        if mac_algorithm not in MAC_ALGORITHMS.get(key_spec, ()):
            raise InvalidInput(f"MAC algorithm {mac_algorithm} is not valid for "
                               f"key spec {key_spec}")
        self._require(key_spec)
        self._require(mac_algorithm)
        handle = self._handle(wrapped_key, key_spec)
        try:
            return bytes(handle.sign(message,
                                     mechanism=HMAC_MECHANISM[ALGORITHM_HASH[mac_algorithm]]))
        except PKCS11Error as exc:
            raise HsmError(f"token {self.partition.token_label!r} failed {mac_algorithm} "
                           f"({type(exc).__name__})") from None

    def generate_mac(self, wrapped_key: bytes, key_spec: str, mac_algorithm: str,
                     message: bytes) -> bytes:
        """KMS GenerateMac: HMAC in the token."""
        return self._mac(wrapped_key, key_spec, mac_algorithm, message)

    def verify_mac(self, wrapped_key: bytes, key_spec: str, mac_algorithm: str,
                   message: bytes, mac: bytes) -> bool:
        """KMS VerifyMac: recompute in the token, compare on the host in constant time."""
        return hmac.compare_digest(self._mac(wrapped_key, key_spec, mac_algorithm, message),
                                   mac)


def _destroy(handle: Any) -> None:
    with contextlib.suppress(PKCS11Error):
        handle.destroy()
