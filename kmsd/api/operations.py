"""The protocol table: `TrentService.<Op>` to the service function that serves it.

Every operation of the KMS model that is not listed here is answered with
UnsupportedOperationException naming it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from kmsd.service import (
    aliases,
    asymmetric,
    crypto,
    custom_key_stores,
    data_key_pairs,
    grants,
    key_import,
    keys,
    rotation,
    tags,
)
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore

Handler = Callable[[ServiceCore, RequestContext, dict[str, Any]], Awaitable[dict[str, Any]]]

OPERATIONS: dict[str, Handler] = {
    "CreateKey": keys.create_key,
    "CreateCustomKeyStore": custom_key_stores.create_custom_key_store,
    "DescribeCustomKeyStores": custom_key_stores.describe_custom_key_stores,
    "UpdateCustomKeyStore": custom_key_stores.update_custom_key_store,
    "ConnectCustomKeyStore": custom_key_stores.connect_custom_key_store,
    "DisconnectCustomKeyStore": custom_key_stores.disconnect_custom_key_store,
    "DeleteCustomKeyStore": custom_key_stores.delete_custom_key_store,
    "DescribeKey": keys.describe_key,
    "ListKeys": keys.list_keys,
    "EnableKey": keys.enable_key,
    "DisableKey": keys.disable_key,
    "UpdateKeyDescription": keys.update_key_description,
    "ScheduleKeyDeletion": keys.schedule_key_deletion,
    "CancelKeyDeletion": keys.cancel_key_deletion,
    "GetKeyPolicy": keys.get_key_policy,
    "PutKeyPolicy": keys.put_key_policy,
    "CreateGrant": grants.create_grant,
    "ListGrants": grants.list_grants,
    "ListRetirableGrants": grants.list_retirable_grants,
    "RetireGrant": grants.retire_grant,
    "RevokeGrant": grants.revoke_grant,
    "ListKeyPolicies": keys.list_key_policies,
    "GetKeyLastUsage": keys.get_key_last_usage,
    "EnableKeyRotation": rotation.enable_key_rotation,
    "DisableKeyRotation": rotation.disable_key_rotation,
    "GetKeyRotationStatus": rotation.get_key_rotation_status,
    "RotateKeyOnDemand": rotation.rotate_key_on_demand,
    "ListKeyRotations": rotation.list_key_rotations,
    "TagResource": tags.tag_resource,
    "UntagResource": tags.untag_resource,
    "ListResourceTags": tags.list_resource_tags,
    "Encrypt": crypto.encrypt,
    "Decrypt": crypto.decrypt,
    "ReEncrypt": crypto.re_encrypt,
    "GenerateDataKey": crypto.generate_data_key,
    "GenerateDataKeyWithoutPlaintext": crypto.generate_data_key_without_plaintext,
    "GenerateRandom": crypto.generate_random,
    "GenerateDataKeyPair": data_key_pairs.generate_data_key_pair,
    "GenerateDataKeyPairWithoutPlaintext": data_key_pairs.generate_data_key_pair_without_plaintext,
    "GetPublicKey": asymmetric.get_public_key,
    "Sign": asymmetric.sign,
    "Verify": asymmetric.verify,
    "GenerateMac": asymmetric.generate_mac,
    "VerifyMac": asymmetric.verify_mac,
    "DeriveSharedSecret": asymmetric.derive_shared_secret,
    "GetParametersForImport": key_import.get_parameters_for_import,
    "ImportKeyMaterial": key_import.import_key_material,
    "DeleteImportedKeyMaterial": key_import.delete_imported_key_material,
    "CreateAlias": aliases.create_alias,
    "UpdateAlias": aliases.update_alias,
    "DeleteAlias": aliases.delete_alias,
    "ListAliases": aliases.list_aliases,
}

# Operations that only read; everything else is a write or a use of a key.
READ_ONLY = frozenset({"DescribeKey", "ListKeys", "ListAliases", "GetKeyPolicy",
                       "ListKeyPolicies", "GetKeyRotationStatus", "ListKeyRotations",
                       "ListResourceTags", "ListGrants", "GetKeyLastUsage", "ListRetirableGrants"})
