"""Imported key material in the pure state machine: PendingImport, import tokens, the check
value that refuses other material, deletion and the leader's expiry -- no Raft, no HSM.

AWS references: API ImportKeyMaterial ("you must reimport the same key material that was
previously imported", IncorrectKeyMaterialException), DeleteImportedKeyMaterial ("the key
state changes to PendingImport"), developer guide key-state table footnote [5].
"""

from __future__ import annotations

import datetime

import pytest

from cluster import commands as c
from cluster.state import (
    KEY_STATE_DISABLED,
    KEY_STATE_ENABLED,
    KEY_STATE_PENDING_IMPORT,
    Applied,
    KmsState,
    Rejected,
)
from kmsd.service import key_import

KEY = "11111111-2222-3333-4444-555555555555"
T0 = 1_800_000_000.0


def _state(origin: str = "EXTERNAL") -> KmsState:
    state = KmsState()
    result = state.apply(c.CreateKey(KEY, "us-east-1", "111122223333", "", "ENCRYPT_DECRYPT",
                                     "SYMMETRIC_DEFAULT", origin, "{}", (), b"" if origin ==
                                     "EXTERNAL" else b"w" * 40, T0))
    assert isinstance(result, Applied)
    return state


def _params(state: KmsState, token_id: bytes = b"t" * 16, expires_at: float = T0 + 86400
            ) -> None:
    assert isinstance(state.apply(c.SetImportParameters(
        KEY, token_id, "RSAES_OAEP_SHA_1", "RSA_2048", b"wrapped-private", b"spki",
        expires_at)), Applied)


def _import(state: KmsState, check: str = "aa", at: float = T0 + 10,
            token_id: bytes = b"t" * 16, valid_to: float | None = None) -> Applied | Rejected:
    return state.apply(c.ImportKeyMaterial(
        KEY, token_id, b"m" * 40, check,
        "KEY_MATERIAL_EXPIRES" if valid_to else "KEY_MATERIAL_DOES_NOT_EXPIRE", valid_to, at))


def test_external_key_starts_without_material() -> None:
    record = _state().keys[KEY]
    assert record.key_state == KEY_STATE_PENDING_IMPORT and record.backing_keys == ()
    refused = _state().apply(c.SetKeyEnabled(KEY, True, T0))
    assert refused == Rejected("KMSInvalidStateException", f"{record.arn} is pending import.")


def test_import_enables_and_other_material_is_refused() -> None:
    state = _state()
    _params(state)
    record = _import(state).value
    assert record.key_state == KEY_STATE_ENABLED and record.backing_keys[0].wrapped == b"m" * 40
    assert _import(state, check="bb").error_type == "IncorrectKeyMaterialException"
    state.apply(c.SetKeyEnabled(KEY, False, T0))
    # Re-importing the same material keeps the state (Disabled stays Disabled).
    assert _import(state).value.key_state == KEY_STATE_DISABLED


def test_tokens_are_checked_at_apply() -> None:
    state = _state()
    assert _import(state).error_type == "InvalidImportTokenException"
    _params(state)
    assert _import(state, token_id=b"x" * 16).error_type == "InvalidImportTokenException"
    assert _import(state, at=T0 + 86401).error_type == "ExpiredImportTokenException"
    normal = _state("AWS_KMS")
    refused = normal.apply(c.SetImportParameters(KEY, b"t" * 16, "RSAES_OAEP_SHA_1", "RSA_2048",
                                                 b"w", b"p", T0))
    assert refused.error_type == "UnsupportedOperationException"


def test_delete_then_reimport_keeps_version_one() -> None:
    state = _state()
    _params(state)
    _import(state)
    result = state.apply(c.DeleteImportedKeyMaterial(KEY, T0 + 20)).value
    # Every node learns which material to forget (its HSM handles for it).
    assert result.removed == (b"m" * 40,)
    deleted = result.record
    assert deleted.key_state == KEY_STATE_PENDING_IMPORT and deleted.backing_keys == ()
    assert deleted.material_check == "aa"
    assert _import(state, check="bb").error_type == "IncorrectKeyMaterialException"
    again = _import(state, at=T0 + 30).value
    assert again.key_state == KEY_STATE_ENABLED and again.backing_keys[0].version == 1


def test_expiry_rechecks_valid_to() -> None:
    state = _state()
    _params(state)
    _import(state, valid_to=T0 + 100)
    assert state.apply(c.DeleteImportedKeyMaterial(KEY, T0 + 99, expired_only=True)).value \
        is None
    expired = state.apply(c.DeleteImportedKeyMaterial(KEY, T0 + 100, expired_only=True)).value
    assert expired.removed == (b"m" * 40,)
    assert expired.record.key_state == KEY_STATE_PENDING_IMPORT
    # A repeated proposal changes nothing.
    assert state.apply(c.DeleteImportedKeyMaterial(KEY, T0 + 200, expired_only=True)).value \
        is None


def test_snapshot_and_command_round_trip() -> None:
    state = _state()
    _params(state)
    _import(state, valid_to=T0 + 100)
    copy = KmsState()
    copy.restore_snapshot(state.to_snapshot())
    assert copy.fingerprint() == state.fingerprint()
    assert copy.import_parameters[KEY].token_id == b"t" * 16
    command = c.ImportKeyMaterial(KEY, b"t" * 16, b"m" * 40, "aa", "KEY_MATERIAL_EXPIRES",
                                  T0 + 5, T0)
    assert c.decode(c.encode(command)) == command
    old = c.encode(c.DeleteImportedKeyMaterial(KEY, T0))
    assert c.decode(old).expired_only is False


def test_import_token_binding() -> None:
    record = _state().keys[KEY]
    state = _state()
    _params(state)
    parameters = state.import_parameters[KEY]
    token = key_import.encode_token(parameters.token_id, KEY, parameters.public_key)
    assert key_import.check_token(token, record, parameters, T0) is parameters
    with pytest.raises(Exception, match="expired"):
        key_import.check_token(token, record, parameters, T0 + 86401)
    with pytest.raises(Exception, match="invalid"):
        key_import.check_token(token[:-1] + b"\x00", record, parameters, T0)


def test_valid_to_rules() -> None:
    now = T0
    assert key_import.valid_to_of({}, now) == ("KEY_MATERIAL_DOES_NOT_EXPIRE", None)
    when = datetime.datetime.fromtimestamp(now + 3600, tz=datetime.UTC)
    assert key_import.valid_to_of({"ValidTo": when}, now) == ("KEY_MATERIAL_EXPIRES", now + 3600)
    for bad in ({"ExpirationModel": "KEY_MATERIAL_EXPIRES"},
                {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE", "ValidTo": when},
                {"ValidTo": datetime.datetime.fromtimestamp(now - 1, tz=datetime.UTC)},
                {"ValidTo": datetime.datetime.fromtimestamp(now + 366 * 86400, tz=datetime.UTC)}):
        with pytest.raises(Exception, match="ValidTo"):
            key_import.valid_to_of(bad, now)


def _asymmetric_state() -> KmsState:
    state = KmsState()
    assert isinstance(state.apply(c.CreateKey(KEY, "us-east-1", "111122223333", "",
                                              "SIGN_VERIFY", "ECC_NIST_P256", "EXTERNAL", "{}",
                                              (), b"", T0)), Applied)
    _params(state)
    return state


def _import_asymmetric(state: KmsState, public_key: bytes | None, check: str = "aa",
                       at: float = T0 + 10) -> Applied | Rejected:
    return state.apply(c.ImportKeyMaterial(KEY, b"t" * 16, b"p" * 160, check,
                                           "KEY_MATERIAL_DOES_NOT_EXPIRE", None, at,
                                           public_key=public_key))


def test_asymmetric_import_brings_its_public_key() -> None:
    """AWS: "For asymmetric key pairs, encrypt and import only the private key. AWS KMS
    derives the public key from the private key." -- the proposer's HSM derives it."""
    state = _asymmetric_state()
    assert state.keys[KEY].public_key is None
    # The proposer must carry the derived public key for an asymmetric key, and none for
    # symmetric or HMAC keys.
    assert _import_asymmetric(state, None).error_type == "KMSInternalException"
    record = _import_asymmetric(state, b"spki-1").value
    assert record.public_key == b"spki-1" and record.key_state == KEY_STATE_ENABLED
    deleted = state.apply(c.DeleteImportedKeyMaterial(KEY, T0 + 20)).value.record
    # The public key is not secret and stays: only the same key pair may come back.
    assert deleted.public_key == b"spki-1" and deleted.backing_keys == ()
    assert _import_asymmetric(state, b"spki-2", check="bb").error_type == \
        "IncorrectKeyMaterialException"
    assert _import_asymmetric(state, b"spki-2").error_type == "IncorrectKeyMaterialException"
    assert _import_asymmetric(state, b"spki-1", at=T0 + 30).value.key_state == KEY_STATE_ENABLED
    symmetric = _state()
    _params(symmetric)
    assert symmetric.apply(c.ImportKeyMaterial(
        KEY, b"t" * 16, b"m" * 40, "aa", "KEY_MATERIAL_DOES_NOT_EXPIRE", None, T0 + 10,
        public_key=b"spki")).error_type == "KMSInternalException"
    copy = KmsState()
    copy.restore_snapshot(state.to_snapshot())
    assert copy.fingerprint() == state.fingerprint()
