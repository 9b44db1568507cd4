"""Tests for kmsd.service.key_lookup: resolving a KeyId parameter as AWS KMS does.

Encrypt, KeyId: "To specify a KMS key, use its key ID, key ARN, alias name, or alias ARN. When
using an alias name, prefix it with "alias/"." The state is built only through KmsState.apply.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import commands as c
from cluster.state import Applied, KeyRecord, KmsState
from kmsd.errors import KmsError
from kmsd.service.key_lookup import is_key_id, resolve_key

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
REGION = "us-east-2"
OTHER_REGION = "eu-west-1"
KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY2 = "0987dcba-09fe-87dc-65ba-ab0987654321"
EU_KEY = "11111111-2222-4333-8444-555555555555"
MISSING = "99999999-9999-4999-8999-999999999999"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY}"
ALIAS_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/ExampleAlias"


def create_key(key_id: str, region: str = REGION, account_id: str = ACCOUNT) -> c.CreateKey:
    return c.CreateKey(key_id=key_id, region=region, account_id=account_id, description="",
                       key_usage="ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT",
                       origin="AWS_KMS", policy="{}", tags=(), wrapped_backing_key=b"w", at=1.0)


def build(*cmds: c.Command) -> KmsState:
    state = KmsState()
    for cmd in cmds:
        assert isinstance(state.apply(cmd), Applied), cmd
    return state


@pytest.fixture
def state() -> KmsState:
    return build(create_key(KEY), create_key(KEY2), create_key(EU_KEY, OTHER_REGION),
                 c.CreateAlias(REGION, "alias/ExampleAlias", KEY, 2.0),
                 c.CreateAlias(REGION, "alias/second", KEY2, 2.0),
                 c.CreateAlias(OTHER_REGION, "alias/ExampleAlias", EU_KEY, 2.0))


def resolve(state: KmsState, identifier: str, *, region: str = REGION,
            allow_alias: bool = True) -> KeyRecord:
    return resolve_key(state, region, ACCOUNT, identifier, allow_alias)


def not_found(state: KmsState, identifier: str, *, region: str = REGION,
              allow_alias: bool = True) -> str:
    with pytest.raises(KmsError) as info:
        resolve(state, identifier, region=region, allow_alias=allow_alias)
    assert info.value.error_type == "NotFoundException"
    assert info.value.http_status == 400
    return info.value.message


# --- the four forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("identifier", [
    KEY,                       # "Key ID: 1234abcd-12ab-34cd-56ef-1234567890ab"
    KEY_ARN,                   # "Key ARN: arn:aws:kms:us-east-2:111122223333:key/1234abcd-..."
    "alias/ExampleAlias",      # "Alias name: alias/ExampleAlias"
    ALIAS_ARN,                 # "Alias ARN: arn:aws:kms:us-east-2:111122223333:alias/ExampleAlias"
])
def test_the_four_forms_resolve(state: KmsState, identifier: str) -> None:
    record = resolve(state, identifier)
    assert record is state.keys[KEY]
    assert record.arn == KEY_ARN


def test_aliases_are_per_region(state: KmsState) -> None:
    # CreateAlias: "you can have aliases with the same name in different Regions."
    assert resolve(state, "alias/ExampleAlias", region=OTHER_REGION).key_id == EU_KEY
    assert resolve(state, "alias/second").key_id == KEY2
    assert not_found(state, "alias/second", region=OTHER_REGION) == (
        f"Alias arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:alias/second is not found.")


def test_alias_follows_update_and_delete() -> None:
    state = build(create_key(KEY), create_key(KEY2),
                  c.CreateAlias(REGION, "alias/x", KEY, 1.0))
    assert resolve(state, "alias/x").key_id == KEY
    assert isinstance(state.apply(c.UpdateAlias(REGION, "alias/x", KEY2, 2.0)), Applied)
    assert resolve(state, "alias/x").key_id == KEY2
    assert isinstance(state.apply(c.DeleteAlias(REGION, "alias/x")), Applied)
    assert not_found(state, "alias/x") == (
        f"Alias arn:aws:kms:{REGION}:{ACCOUNT}:alias/x is not found.")


def test_disabled_key_still_resolves() -> None:
    # Resolution finds the key; whether its state allows the operation is decided later.
    state = build(create_key(KEY), c.SetKeyEnabled(KEY, False, 2.0))
    assert resolve(state, KEY).key_state == "Disabled"


def test_alias_names_are_case_sensitive(state: KmsState) -> None:
    assert not_found(state, "alias/examplealias") == (
        f"Alias arn:aws:kms:{REGION}:{ACCOUNT}:alias/examplealias is not found.")


# --- not found --------------------------------------------------------------------------------

@pytest.mark.parametrize("identifier", [
    f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:key/{KEY}",
    f"arn:aws:kms:{REGION}:{OTHER_ACCOUNT}:key/{KEY}",
    f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:alias/ExampleAlias",
    f"arn:aws:kms:{REGION}:{OTHER_ACCOUNT}:alias/ExampleAlias",
])
def test_arn_of_another_region_or_account_is_not_found(state: KmsState,
                                                       identifier: str) -> None:
    assert not_found(state, identifier) == f"Invalid arn {identifier}"


def test_key_of_another_region_is_not_found(state: KmsState) -> None:
    # A key belongs to one region, even when named by its bare id.
    assert not_found(state, EU_KEY) == (
        f"Key 'arn:aws:kms:{REGION}:{ACCOUNT}:key/{EU_KEY}' does not exist")
    assert resolve(state, EU_KEY, region=OTHER_REGION).key_id == EU_KEY


@pytest.mark.parametrize("identifier", [MISSING, f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{MISSING}"])
def test_missing_key(state: KmsState, identifier: str) -> None:
    assert not_found(state, identifier) == (
        f"Key 'arn:aws:kms:{REGION}:{ACCOUNT}:key/{MISSING}' does not exist")


@pytest.mark.parametrize("identifier", ["alias/nope", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/nope"])
def test_missing_alias(state: KmsState, identifier: str) -> None:
    assert not_found(state, identifier) == (
        f"Alias arn:aws:kms:{REGION}:{ACCOUNT}:alias/nope is not found.")


@pytest.mark.parametrize("identifier", [
    "", "foo", "1234", KEY.upper(), "{" + KEY + "}", KEY.replace("-", ""), KEY[:-1], KEY + "0",
    f"key/{KEY}", "ALIAS/ExampleAlias", "alias", " alias/ExampleAlias", f" {KEY}",
    f"arn:aws:kms:{REGION}:{ACCOUNT}:{KEY}",            # no key/ prefix: not an ARN
    f"arn:aws:kms:{REGION}:{ACCOUNT}:key/nope",         # an ARN, but no key id in it
    f"arn:aws:kms:{REGION}:{ACCOUNT}:key/",             # no key id at all
    f"arn:aws:kms:{REGION}:12345:key/{KEY}",            # account is not 12 digits
    f"arn:aws:iam::{ACCOUNT}:key/{KEY}",                 # another service
    f"arn:aws-cn:kms:{REGION}:{ACCOUNT}:key/{KEY}",      # another partition
])
def test_malformed_identifier(state: KmsState, identifier: str) -> None:
    assert not_found(state, identifier) == f"Invalid keyId '{identifier}'"


@pytest.mark.parametrize("identifier", ["alias/ExampleAlias", ALIAS_ARN])
def test_alias_refused_where_not_allowed(state: KmsState, identifier: str) -> None:
    assert not_found(state, identifier, allow_alias=False) == f"Invalid keyId '{identifier}'"
    assert resolve(state, KEY, allow_alias=False).key_id == KEY
    assert resolve(state, KEY_ARN, allow_alias=False).key_id == KEY


def test_is_key_id() -> None:
    assert is_key_id(KEY)
    assert not is_key_id(KEY.upper())
    assert not is_key_id(KEY_ARN)
    assert not is_key_id("alias/" + KEY)


@settings(max_examples=300, deadline=None)
@given(identifier=st.text(max_size=80)
       | st.sampled_from([KEY, KEY_ARN, ALIAS_ARN, "alias/", "arn:aws:kms:"]).flatmap(
           lambda prefix: st.text(max_size=20).map(lambda tail: prefix + tail)))
def test_resolution_finds_a_key_or_raises_not_found(identifier: str) -> None:
    state = build(create_key(KEY), c.CreateAlias(REGION, "alias/ExampleAlias", KEY, 1.0))
    try:
        record = resolve(state, identifier)
    except KmsError as error:
        assert error.error_type == "NotFoundException"
        return
    assert record.key_id == KEY
    assert identifier in {KEY, KEY_ARN, "alias/ExampleAlias", ALIAS_ARN}


# --- fixed bugs -------------------------------------------------------------------------------

@pytest.mark.parametrize("identifier", [KEY, f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY}"])
def test_key_of_another_account_is_not_found(identifier: str) -> None:
    state = build(create_key(KEY, account_id=OTHER_ACCOUNT))
    not_found(state, identifier)


@pytest.mark.parametrize("identifier", [KEY_ARN + "\n", ALIAS_ARN + "\n"])
def test_arn_with_trailing_newline_is_not_a_key(state: KmsState, identifier: str) -> None:
    not_found(state, identifier)


def test_key_arn_naming_an_alias_is_not_a_key(state: KmsState) -> None:
    not_found(state, f"arn:aws:kms:{REGION}:{ACCOUNT}:key/alias/ExampleAlias")
