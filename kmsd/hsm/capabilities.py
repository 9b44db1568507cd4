"""What this node's token can do for each KMS asymmetric/HMAC key spec and algorithm.

Owns the KMS vocabulary of asymmetric, HMAC and key-agreement keys (which
KeySpec allows which algorithm) and `probe(partition)`, which decides, once
at start-up, how each of them is carried out on this token:

- "in-token": the token does the whole cryptographic operation;
- "raw-in-token+host-decoding": the token does the raw private-key operation
  (CKM_RSA_X_509) and the host removes the padding (kmsd.hsm.oaep);
- "host-hash+in-token-sign": the host hashes, the token signs the digest
  (raw CKM_ECDSA; SoftHSM2 has no CKM_ECDSA_SHA*);
- "unsupported", with the reason.

Key specs are "in-token" when the token generates the key, wraps its private
part under an AES key with CKM_AES_KEY_WRAP_PAD and unwraps it again -- kmsd
keeps private keys only in that wrapped form, so a key the token cannot wrap
is unsupported even if the token can generate it (Ed25519 on SoftHSM2 2.6.1).

The probe works on ephemeral session objects: a throw-away AES wrapping key
(never the domain key), a 1024-bit RSA key pair and one pair per curve, all
destroyed before it returns; it needs no domain key. It is measured, not read
from the mechanism list, where the list is known to lie (SoftHSM2 2.6.1
lists CKM_RSA_PKCS_OAEP but refuses SHA-256 parameters, lists CKM_EDDSA but
ignores the pre-hash flag). It took 35-130 ms on SoftHSM2 on the dev machine,
mostly the RSA-1024 key generation (see `TokenCapabilities.probe_seconds`);
run it once per process, on the thread that owns the partition.

Symmetric keys (SYMMETRIC_DEFAULT) are kmsd.hsm.partition's business and are not listed.
Never logs or returns key material; the probe keys are random and discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from kmsd.hsm import oaep
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmPartition, load_library

# -- paths -------------------------------------------------------------------

IN_TOKEN = "in-token"
RAW_IN_TOKEN_HOST_DECODING = "raw-in-token+host-decoding"
HOST_HASH_IN_TOKEN_SIGN = "host-hash+in-token-sign"
UNSUPPORTED = "unsupported"
PATHS = (IN_TOKEN, RAW_IN_TOKEN_HOST_DECODING, HOST_HASH_IN_TOKEN_SIGN, UNSUPPORTED)

# -- KMS vocabulary ----------------------------------------------------------

RSA_KEY_SPECS: dict[str, int] = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
# KMS KeySpec -> the curve's name in asn1crypto/python-pkcs11 (also cryptography's `curve.name`).
EC_KEY_SPECS: dict[str, str] = {
    "ECC_NIST_P256": "secp256r1", "ECC_NIST_P384": "secp384r1",
    "ECC_NIST_P521": "secp521r1", "ECC_SECG_P256K1": "secp256k1"}
ED25519_KEY_SPEC = "ECC_NIST_EDWARDS25519"
HMAC_KEY_SPECS: dict[str, int] = {"HMAC_224": 224, "HMAC_256": 256, "HMAC_384": 384,
                                  "HMAC_512": 512}
# KMS key specs kmsd does not implement on any token yet; listed so the table is complete.
# (ML-KEM is not a KMS KeySpec today; it is listed so a token that gains it shows up.)
ML_DSA_KEY_SPECS = ("ML_DSA_44", "ML_DSA_65", "ML_DSA_87")
ML_KEM_KEY_SPECS = ("ML_KEM_512", "ML_KEM_768", "ML_KEM_1024")
SM2_KEY_SPEC = "SM2"

RSASSA_PSS = ("RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512")
RSASSA_PKCS1 = ("RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384",
                "RSASSA_PKCS1_V1_5_SHA_512")
ECDSA = ("ECDSA_SHA_256", "ECDSA_SHA_384", "ECDSA_SHA_512")
ED25519_SHA_512 = "ED25519_SHA_512"
ED25519_PH_SHA_512 = "ED25519_PH_SHA_512"
RSAES_OAEP = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
HMAC_ALGORITHMS = ("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512")
ECDH = "ECDH"
KEY_AGREEMENT_KEY_SPECS = ("ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521")

# Which algorithms KMS allows for which key spec (AWS KMS developer guide, "Key spec reference").
SIGNING_ALGORITHMS: dict[str, tuple[str, ...]] = {
    **{spec: RSASSA_PSS + RSASSA_PKCS1 for spec in RSA_KEY_SPECS},
    "ECC_NIST_P256": ("ECDSA_SHA_256",), "ECC_NIST_P384": ("ECDSA_SHA_384",),
    "ECC_NIST_P521": ("ECDSA_SHA_512",), "ECC_SECG_P256K1": ("ECDSA_SHA_256",),
    ED25519_KEY_SPEC: (ED25519_SHA_512, ED25519_PH_SHA_512),
    **{spec: ("ML_DSA_SHAKE_256",) for spec in ML_DSA_KEY_SPECS},
    SM2_KEY_SPEC: ("SM2DSA",)}
ENCRYPTION_ALGORITHMS: dict[str, tuple[str, ...]] = {
    **{spec: RSAES_OAEP for spec in RSA_KEY_SPECS}, SM2_KEY_SPEC: ("SM2PKE",)}
MAC_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "HMAC_224": ("HMAC_SHA_224",), "HMAC_256": ("HMAC_SHA_256",),
    "HMAC_384": ("HMAC_SHA_384",), "HMAC_512": ("HMAC_SHA_512",)}
KEY_AGREEMENT_ALGORITHMS: dict[str, tuple[str, ...]] = {
    **{spec: (ECDH,) for spec in KEY_AGREEMENT_KEY_SPECS}, SM2_KEY_SPEC: (ECDH,)}

# hashlib name per algorithm; the DIGEST message type needs a digest of exactly this size.
ALGORITHM_HASH: dict[str, str] = {
    "RSASSA_PSS_SHA_256": "sha256", "RSASSA_PSS_SHA_384": "sha384",
    "RSASSA_PSS_SHA_512": "sha512",
    "RSASSA_PKCS1_V1_5_SHA_256": "sha256", "RSASSA_PKCS1_V1_5_SHA_384": "sha384",
    "RSASSA_PKCS1_V1_5_SHA_512": "sha512",
    "ECDSA_SHA_256": "sha256", "ECDSA_SHA_384": "sha384", "ECDSA_SHA_512": "sha512",
    ED25519_SHA_512: "sha512", ED25519_PH_SHA_512: "sha512",
    "RSAES_OAEP_SHA_1": "sha1", "RSAES_OAEP_SHA_256": "sha256",
    "HMAC_SHA_224": "sha224", "HMAC_SHA_256": "sha256", "HMAC_SHA_384": "sha384",
    "HMAC_SHA_512": "sha512"}

KEY_SPECS: tuple[str, ...] = (*RSA_KEY_SPECS, *EC_KEY_SPECS, ED25519_KEY_SPEC, *HMAC_KEY_SPECS,
                              *ML_DSA_KEY_SPECS, *ML_KEM_KEY_SPECS, SM2_KEY_SPEC)
ALL_SIGNING_ALGORITHMS: tuple[str, ...] = (*RSASSA_PSS, *RSASSA_PKCS1, *ECDSA, ED25519_SHA_512,
                                           ED25519_PH_SHA_512, "ML_DSA_SHAKE_256", "SM2DSA")
ALL_ENCRYPTION_ALGORITHMS: tuple[str, ...] = (*RSAES_OAEP, "SM2PKE")

# The mechanisms kmsd uses per hash (python-pkcs11 names); asymmetric.py uses them too.
HASH_MECHANISM = {"sha1": Mechanism.SHA_1, "sha224": Mechanism.SHA224,
                   "sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384,
                   "sha512": Mechanism.SHA512}
MGF_FOR_HASH = {"sha1": MGF.SHA1, "sha224": MGF.SHA224, "sha256": MGF.SHA256, "sha384": MGF.SHA384,
        "sha512": MGF.SHA512}
PSS_MECHANISM = {"sha256": Mechanism.SHA256_RSA_PKCS_PSS,
                  "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
                  "sha512": Mechanism.SHA512_RSA_PKCS_PSS}
PKCS1_MECHANISM = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
                    "sha512": Mechanism.SHA512_RSA_PKCS}
HMAC_MECHANISM = {"sha224": Mechanism.SHA224_HMAC, "sha256": Mechanism.SHA256_HMAC,
                   "sha384": Mechanism.SHA384_HMAC, "sha512": Mechanism.SHA512_HMAC}
CRYPTOGRAPHY_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512}

# PKCS#11 CKA_EC_PARAMS for Ed25519: the OID 1.3.101.112 (RFC 8410), DER-encoded.
ED25519_EC_PARAMS = bytes.fromhex("06032b6570")
# The same curve named as a PrintableString, which some tokens report instead.
ED25519_EC_PARAMS_NAMED = bytes.fromhex("130c656477617264733235353139")
# Unwrapping a private key with python-pkcs11's default template fails (FACTS.md §0.5).
PRIVATE_UNWRAP_FIX: dict[Attribute, Any] = {
    Attribute.ENCRYPT: DEFAULT, Attribute.VERIFY: DEFAULT, Attribute.WRAP: DEFAULT}
_PROBE_RSA_BITS = 1024  # big enough for OAEP-SHA256 and PSS-SHA256; never a customer key

KIND_KEY_SPEC = "key_spec"
KIND_SIGNING = "signing_algorithm"
KIND_ENCRYPTION = "encryption_algorithm"
KIND_MAC = "mac_algorithm"
KIND_KEY_AGREEMENT = "key_agreement_algorithm"


@dataclass(frozen=True)
class Capability:
    """How one KMS key spec or algorithm is carried out on this token, and why."""

    kind: str
    name: str
    path: str
    detail: str


@dataclass(frozen=True)
class TokenCapabilities:
    """The probe's answer for one token: an entry per KMS key spec and algorithm."""

    token_label: str
    token_manufacturer: str
    token_model: str
    token_firmware: str
    library: str
    mechanisms: tuple[str, ...]
    entries: tuple[Capability, ...]
    probe_seconds: float

    def entry(self, name: str) -> Capability:
        for candidate in self.entries:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def path(self, name: str) -> str:
        return self.entry(name).path

    def supports(self, name: str) -> bool:
        return self.path(name) != UNSUPPORTED

    def with_path(self, name: str, path: str,
                  detail: str = "set by the operator") -> TokenCapabilities:
        """A copy with one entry's path replaced (an operator override, or a test forcing one)."""
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}")
        old = self.entry(name)
        entries = tuple(replace(e, path=path, detail=detail) if e is old else e
                        for e in self.entries)
        return replace(self, entries=entries)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, name, path, detail) per entry, for `kmsctl hsm capabilities`."""
        return [(e.kind, e.name, e.path, e.detail) for e in self.entries]


# -- probing -----------------------------------------------------------------

class _Probe:
    """One probe run: ephemeral objects it made (destroyed at the end) and what it found."""

    def __init__(self, partition: HsmPartition) -> None:
        self.partition = partition
        self.session = partition.session
        self.mechanisms = set(partition.token.slot.get_mechanisms())
        self.entries: list[Capability] = []
        self._objects: list[Any] = []
        self.wrap_key = self.keep(self.session.generate_key(
            KeyType.AES, 256, store=False,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}))

    def keep(self, obj: Any) -> Any:
        self._objects.append(obj)
        return obj

    def close(self) -> None:
        for obj in reversed(self._objects):
            with contextlib.suppress(PKCS11Error):
                obj.destroy()
        self._objects.clear()

    def add(self, kind: str, name: str, path: str, detail: str) -> None:
        self.entries.append(Capability(kind, name, path, detail))

    def has(self, *mechanisms: Mechanism) -> bool:
        return all(m in self.mechanisms for m in mechanisms)

    def missing(self, *mechanisms: Mechanism) -> str:
        names = [m.name for m in mechanisms if m not in self.mechanisms]
        return "token lists no " + ", ".join("CKM_" + n for n in names)

    def wrap_roundtrip(self, private: Any, object_class: ObjectClass, key_type: KeyType,
                       capabilities: MechanismFlag) -> Any:
        """Wrap a key under the probe's AES key and unwrap it the way kmsd does."""
        wrapped = bytes(self.wrap_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        template: dict[Attribute, Any] = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        if object_class == ObjectClass.PRIVATE_KEY:
            template.update(PRIVATE_UNWRAP_FIX)
        return self.keep(self.wrap_key.unwrap_key(
            object_class, key_type, wrapped, store=False, mechanism=Mechanism.AES_KEY_WRAP_PAD,
            capabilities=capabilities, template=template))


def _failure(exc: Exception) -> str:
    return type(exc).__name__


def _probe_rsa(p: _Probe) -> None:
    keygen = Mechanism.RSA_PKCS_KEY_PAIR_GEN
    private = public_key = None
    keys_detail = ""
    if not p.has(keygen, Mechanism.AES_KEY_WRAP_PAD):
        keys_detail = p.missing(keygen, Mechanism.AES_KEY_WRAP_PAD)
    else:
        try:
            info = p.partition.token.slot.get_mechanism_info(keygen)
            public, generated = p.session.generate_keypair(
                KeyType.RSA, _PROBE_RSA_BITS, store=False,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
            p.keep(public)
            p.keep(generated)
            public_key = rsa.RSAPublicNumbers(
                int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
            private = p.wrap_roundtrip(generated, ObjectClass.PRIVATE_KEY, KeyType.RSA,
                                       MechanismFlag.SIGN | MechanismFlag.DECRYPT)
        except PKCS11Error as exc:
            keys_detail = f"RSA key generation or KWP wrap/unwrap failed ({_failure(exc)})"
    for spec, bits in RSA_KEY_SPECS.items():
        if private is None:
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, keys_detail)
        elif not info.min_key_length <= bits <= info.max_key_length:
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED,
                  f"token generates RSA keys of {info.min_key_length}-{info.max_key_length} bits")
        else:
            p.add(KIND_KEY_SPEC, spec, IN_TOKEN,
                  "CKM_RSA_PKCS_KEY_PAIR_GEN; private key kept wrapped (CKM_AES_KEY_WRAP_PAD)")

    for algorithm in RSASSA_PSS + RSASSA_PKCS1:
        hash_name = ALGORITHM_HASH[algorithm]
        pss = algorithm in RSASSA_PSS
        needed = ((PSS_MECHANISM[hash_name], Mechanism.RSA_PKCS_PSS) if pss
                  else (PKCS1_MECHANISM[hash_name], Mechanism.RSA_PKCS))
        if private is None or public_key is None:
            p.add(KIND_SIGNING, algorithm, UNSUPPORTED, keys_detail)
            continue
        if not p.has(*needed):
            p.add(KIND_SIGNING, algorithm, UNSUPPORTED, p.missing(*needed))
            continue
        detail = (f"RAW: CKM_{needed[0].name}; DIGEST: CKM_{needed[1].name}"
                  + (" (salt = hash length)" if pss else " over a DigestInfo"))
        if hash_name == "sha256":
            # SHA-384/512 PSS need a bigger key than the probe's; SHA-256 checks the parameters.
            ok = _rsa_sign_works(private, public_key, pss)
            if not ok:
                p.add(KIND_SIGNING, algorithm, UNSUPPORTED,
                      f"signature by CKM_{needed[0].name} did not verify")
                continue
        p.add(KIND_SIGNING, algorithm, IN_TOKEN, detail)

    for algorithm in RSAES_OAEP:
        if private is None or public_key is None:
            p.add(KIND_ENCRYPTION, algorithm, UNSUPPORTED, keys_detail)
            continue
        p.add(KIND_ENCRYPTION, algorithm, *_probe_oaep(p, private, public_key, algorithm))


def _rsa_sign_works(private: Any, public_key: rsa.RSAPublicKey, pss: bool) -> bool:
    message = b"kmsd capability probe"
    try:
        if pss:
            signature = private.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                                     mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
            public_key.verify(bytes(signature), message,
                              padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        else:
            signature = private.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
            public_key.verify(bytes(signature), message, padding.PKCS1v15(), hashes.SHA256())
    except (PKCS11Error, InvalidSignature):
        return False
    return True


def _probe_oaep(p: _Probe, private: Any, public_key: rsa.RSAPublicKey,
                algorithm: str) -> tuple[str, str]:
    hash_name = ALGORITHM_HASH[algorithm]
    message = b"kmsd capability probe"
    h = CRYPTOGRAPHY_HASH[hash_name]
    ciphertext = public_key.encrypt(message, padding.OAEP(padding.MGF1(h()), h(), None))
    in_token_failure = "token lists no CKM_RSA_PKCS_OAEP"
    if p.has(Mechanism.RSA_PKCS_OAEP):
        try:
            plaintext = bytes(private.decrypt(
                ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=(HASH_MECHANISM[hash_name], MGF_FOR_HASH[hash_name], None)))
            if plaintext == message:
                return IN_TOKEN, f"CKM_RSA_PKCS_OAEP, {hash_name.upper()}/MGF1-{hash_name.upper()}"
            in_token_failure = "CKM_RSA_PKCS_OAEP returned a wrong plaintext"
        except PKCS11Error as exc:
            in_token_failure = (f"CKM_RSA_PKCS_OAEP with {hash_name.upper()} refused "
                                f"({_failure(exc)})")
    if not p.has(Mechanism.RSA_X_509):
        return UNSUPPORTED, f"{in_token_failure}; token lists no CKM_RSA_X_509"
    try:
        raw = bytes(private.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
        k = public_key.key_size // 8
        if oaep.decode(raw.rjust(k, b"\x00"), hash_name) == message:
            return (RAW_IN_TOKEN_HOST_DECODING,
                    f"{in_token_failure}; CKM_RSA_X_509 in the token + OAEP decoding on the host")
    except (PKCS11Error, HsmAuthenticationFailed) as exc:
        return UNSUPPORTED, f"{in_token_failure}; CKM_RSA_X_509 failed ({_failure(exc)})"
    return UNSUPPORTED, f"{in_token_failure}; CKM_RSA_X_509 gave a wrong result"


def _new_ec_pair(p: _Probe, key_type: KeyType, ec_params: bytes,
                 mechanism: Mechanism) -> tuple[Any, Any]:
    params = p.session.create_domain_parameters(key_type, {Attribute.EC_PARAMS: ec_params},
                                                local=True)
    public, private = params.generate_keypair(
        store=False, mechanism=mechanism,
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
    p.keep(public)
    p.keep(private)
    return public, private


def _ec_public_key(public: Any, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    point = bytes(public[Attribute.EC_POINT])
    # CKA_EC_POINT is a DER OCTET STRING around the X9.62 point; strip the header.
    if point[0] == 0x04 and point[1] == 0x81:
        point = point[3:]
    elif point[0] == 0x04 and point[1] == len(point) - 2:
        point = point[2:]
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


def _probe_ec(p: _Probe) -> None:
    curves = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(),
              "secp521r1": ec.SECP521R1(), "secp256k1": ec.SECP256K1()}
    working: dict[str, Any] = {}
    for spec, curve_name in EC_KEY_SPECS.items():
        needed = (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, Mechanism.AES_KEY_WRAP_PAD)
        if not p.has(*needed):
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, p.missing(*needed))
            continue
        curve = curves[curve_name]
        try:
            public, generated = _new_ec_pair(p, KeyType.EC,
                                             encode_named_curve_parameters(curve_name),
                                             Mechanism.EC_KEY_PAIR_GEN)
            private = p.wrap_roundtrip(generated, ObjectClass.PRIVATE_KEY, KeyType.EC,
                                       MechanismFlag.SIGN | MechanismFlag.DERIVE)
            public_key = _ec_public_key(public, curve)
            digest = hashlib.sha256(b"kmsd capability probe").digest()
            signature = encode_ecdsa_signature(bytes(private.sign(digest,
                                                                  mechanism=Mechanism.ECDSA)))
            public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except (PKCS11Error, InvalidSignature, ValueError) as exc:
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED,
                  f"{curve_name} key generation, KWP wrap/unwrap or ECDSA failed "
                  f"({_failure(exc)})")
            continue
        working[spec] = (private, public_key)
        p.add(KIND_KEY_SPEC, spec, IN_TOKEN,
              f"CKM_EC_KEY_PAIR_GEN on {curve_name}; private key kept wrapped")

    for algorithm in ECDSA:
        specs = [s for s in EC_KEY_SPECS if algorithm in SIGNING_ALGORITHMS[s] and s in working]
        if specs:
            p.add(KIND_SIGNING, algorithm, HOST_HASH_IN_TOKEN_SIGN,
                  f"{ALGORITHM_HASH[algorithm].upper()} on the host, raw CKM_ECDSA in the token "
                  f"(kmsd never uses CKM_ECDSA_SHA*); key specs: {', '.join(specs)}")
        else:
            p.add(KIND_SIGNING, algorithm, UNSUPPORTED, "no working key spec for it")

    # ECDH: the raw shared secret Z is derived as a readable GENERIC_SECRET (KDF NULL).
    failures = []
    for spec in KEY_AGREEMENT_KEY_SPECS:
        if spec not in working:
            failures.append(f"{spec}: no key")
            continue
        if not p.has(Mechanism.ECDH1_DERIVE):
            failures.append(p.missing(Mechanism.ECDH1_DERIVE))
            break
        private, public_key = working[spec]
        peer = ec.generate_private_key(public_key.curve)
        peer_point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        try:
            derived = p.keep(private.derive_key(
                KeyType.GENERIC_SECRET, (public_key.curve.key_size + 7) // 8 * 8, store=False,
                mechanism=Mechanism.ECDH1_DERIVE, mechanism_param=(KDF.NULL, None, peer_point),
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}))
            if bytes(derived[Attribute.VALUE]) != peer.exchange(ec.ECDH(), public_key):
                failures.append(f"{spec}: wrong shared secret")
        except PKCS11Error as exc:
            failures.append(f"{spec}: {_failure(exc)}")
    if failures:
        p.add(KIND_KEY_AGREEMENT, ECDH, UNSUPPORTED, "; ".join(failures))
    else:
        p.add(KIND_KEY_AGREEMENT, ECDH, IN_TOKEN,
              "CKM_ECDH1_DERIVE, KDF NULL, Z read from a non-sensitive GENERIC_SECRET; "
              f"key specs: {', '.join(KEY_AGREEMENT_KEY_SPECS)}")


def _probe_ed25519(p: _Probe) -> None:
    needed = (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA)
    if not p.has(*needed):
        reason = p.missing(*needed)
        for kind, name in ((KIND_KEY_SPEC, ED25519_KEY_SPEC), (KIND_SIGNING, ED25519_SHA_512),
                           (KIND_SIGNING, ED25519_PH_SHA_512)):
            p.add(kind, name, UNSUPPORTED, reason)
        return
    message = b"kmsd capability probe"
    try:
        public, generated = _new_ec_pair(p, KeyType.EC_EDWARDS, ED25519_EC_PARAMS,
                                         Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
        public_key = ed25519.Ed25519PublicKey.from_public_bytes(
            ed25519_public_bytes(bytes(public[Attribute.EC_POINT])))
        pure = bytes(generated.sign(message, mechanism=Mechanism.EDDSA))
        public_key.verify(pure, message)
        digest = hashlib.sha512(message).digest()
        prehashed = bytes(generated.sign(digest, mechanism=Mechanism.EDDSA,
                                         mechanism_param=(True, None)))
        ph_ignored = prehashed == bytes(generated.sign(digest, mechanism=Mechanism.EDDSA))
    except (PKCS11Error, InvalidSignature, ValueError) as exc:
        reason = f"Ed25519 key generation or CKM_EDDSA failed ({_failure(exc)})"
        for kind, name in ((KIND_KEY_SPEC, ED25519_KEY_SPEC), (KIND_SIGNING, ED25519_SHA_512),
                           (KIND_SIGNING, ED25519_PH_SHA_512)):
            p.add(kind, name, UNSUPPORTED, reason)
        return
    try:
        p.wrap_roundtrip(generated, ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS,
                         MechanismFlag.SIGN)
        key_path, key_detail = IN_TOKEN, "CKM_EC_EDWARDS_KEY_PAIR_GEN; private key kept wrapped"
    except PKCS11Error as exc:
        key_path = UNSUPPORTED
        key_detail = (f"token generates Ed25519 keys and signs with CKM_EDDSA but cannot wrap "
                      f"an EC_EDWARDS private key ({_failure(exc)}); kmsd keeps private keys "
                      f"only wrapped")
    p.add(KIND_KEY_SPEC, ED25519_KEY_SPEC, key_path, key_detail)
    p.add(KIND_SIGNING, ED25519_SHA_512, key_path,
          "CKM_EDDSA (pure Ed25519, RAW messages only)" if key_path == IN_TOKEN else key_detail)
    if ph_ignored:
        ph_detail = ("token ignores the CKM_EDDSA phFlag: its 'pre-hashed' signature is a pure "
                     "Ed25519 signature of the digest")
    else:
        ph_detail = ("token may support Ed25519ph, but the host has no Ed25519ph verifier "
                     "(cryptography lacks it), so kmsd cannot check or verify it")
    p.add(KIND_SIGNING, ED25519_PH_SHA_512, UNSUPPORTED, ph_detail)


def _probe_hmac(p: _Probe) -> None:
    for (spec, bits), algorithm in zip(HMAC_KEY_SPECS.items(), HMAC_ALGORITHMS, strict=True):
        hash_name = ALGORITHM_HASH[algorithm]
        mechanism = HMAC_MECHANISM[hash_name]
        needed = (Mechanism.GENERIC_SECRET_KEY_GEN, mechanism, Mechanism.AES_KEY_WRAP_PAD)
        if not p.has(*needed):
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, p.missing(*needed))
            p.add(KIND_MAC, algorithm, UNSUPPORTED, p.missing(*needed))
            continue
        try:
            generated = p.keep(p.session.generate_key(
                KeyType.GENERIC_SECRET, bits, store=False, capabilities=MechanismFlag.SIGN,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}))
            p.wrap_roundtrip(generated, ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET,
                             MechanismFlag.SIGN)
            # Known answer: a key the probe knows, imported as a session object.
            known_key = bytes(range(bits // 8))
            known = p.keep(p.session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: False, Attribute.VALUE: known_key, Attribute.SIGN: True}))
            mac = bytes(known.sign(b"kmsd capability probe", mechanism=mechanism))
            ok = hmac.compare_digest(
                mac, hmac.new(known_key, b"kmsd capability probe", hash_name).digest())
        except PKCS11Error as exc:
            reason = f"GENERIC_SECRET generation, KWP wrap/unwrap or HMAC failed ({_failure(exc)})"
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, reason)
            p.add(KIND_MAC, algorithm, UNSUPPORTED, reason)
            continue
        if not ok:
            p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, f"CKM_{mechanism.name} gave a wrong MAC")
            p.add(KIND_MAC, algorithm, UNSUPPORTED, f"CKM_{mechanism.name} gave a wrong MAC")
            continue
        p.add(KIND_KEY_SPEC, spec, IN_TOKEN,
              f"CKM_GENERIC_SECRET_KEY_GEN, {bits} bits; key kept wrapped")
        p.add(KIND_MAC, algorithm, IN_TOKEN,
              f"CKM_{mechanism.name}; VerifyMac compares on the host in constant time")


def _probe_unimplemented(p: _Probe) -> None:
    def listed(names: Iterable[str]) -> list[str]:
        return [n for n in names if getattr(Mechanism, n, None) in p.mechanisms]

    ml_dsa = listed(("ML_DSA_KEY_PAIR_GEN", "ML_DSA"))
    ml_dsa_reason = ("token lists " + ", ".join("CKM_" + n for n in ml_dsa)
                     + " but kmsd does not implement ML-DSA yet") if ml_dsa else \
        "token lists no CKM_ML_DSA_KEY_PAIR_GEN / CKM_ML_DSA"
    for spec in ML_DSA_KEY_SPECS:
        p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, ml_dsa_reason)
    p.add(KIND_SIGNING, "ML_DSA_SHAKE_256", UNSUPPORTED, ml_dsa_reason)

    ml_kem = listed(("ML_KEM_KEY_PAIR_GEN", "ML_KEM"))
    ml_kem_reason = ("token lists " + ", ".join("CKM_" + n for n in ml_kem)
                     + " but kmsd does not implement ML-KEM yet") if ml_kem else \
        "token lists no CKM_ML_KEM_KEY_PAIR_GEN / CKM_ML_KEM"
    for spec in ML_KEM_KEY_SPECS:
        p.add(KIND_KEY_SPEC, spec, UNSUPPORTED, ml_kem_reason)

    sm2_reason = ("PKCS#11 defines no SM2 mechanism (only vendor-defined ones) and "
                  "python-pkcs11 0.10.1 exposes none; kmsd does not implement SM2")
    p.add(KIND_KEY_SPEC, SM2_KEY_SPEC, UNSUPPORTED, sm2_reason)
    p.add(KIND_SIGNING, "SM2DSA", UNSUPPORTED, sm2_reason)
    p.add(KIND_ENCRYPTION, "SM2PKE", UNSUPPORTED, sm2_reason)


def ed25519_public_bytes(ec_point: bytes) -> bytes:
    """The 32-byte Ed25519 public key from CKA_EC_POINT (DER OCTET STRING or raw)."""
    if len(ec_point) == 34 and ec_point[:2] == b"\x04\x20":
        return ec_point[2:]
    if len(ec_point) == 32:
        return ec_point
    raise ValueError("CKA_EC_POINT is not an Ed25519 public key")


_ORDER = {name: i for i, name in enumerate(
    (*KEY_SPECS, *ALL_SIGNING_ALGORITHMS, *ALL_ENCRYPTION_ALGORITHMS, *HMAC_ALGORITHMS, ECDH))}


def probe(partition: HsmPartition) -> TokenCapabilities:
    """Measure what this token can do, with ephemeral session objects only."""
    started = time.perf_counter()
    p = _Probe(partition)
    try:
        _probe_rsa(p)
        _probe_ec(p)
        _probe_ed25519(p)
        _probe_hmac(p)
        _probe_unimplemented(p)
    finally:
        p.close()
    token = partition.token
    lib = load_library(partition.module_path)
    major, minor = lib.library_version
    library = f"{lib.manufacturer_id.strip()} {lib.library_description.strip()} {major}.{minor}"
    entries = tuple(sorted(p.entries, key=lambda e: _ORDER.get(e.name, len(_ORDER))))
    return TokenCapabilities(
        token_label=token.label, token_manufacturer=token.manufacturer_id,
        token_model=token.model,
        token_firmware="{}.{}".format(*token.firmware_version),
        library=library,
        mechanisms=tuple(sorted(m.name for m in p.mechanisms if hasattr(m, "name"))),
        entries=entries, probe_seconds=time.perf_counter() - started)

