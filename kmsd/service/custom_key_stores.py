"""Custom key stores: CreateCustomKeyStore, DescribeCustomKeyStores, UpdateCustomKeyStore,
ConnectCustomKeyStore, DisconnectCustomKeyStore, DeleteCustomKeyStore.

kmsd implements the CloudHSM type (CustomKeyStoreType AWS_CLOUDHSM, the default) with
PKCS#11 tokens in place of a CloudHSM cluster. How the AWS fields map:

- CloudHsmClusterId (AWS pattern `cluster-[2-7a-zA-Z]{11,16}`): the label of the store's
  token. Every node reaches a token of that label through its own PKCS#11 module (one
  HSM per node, as a CloudHSM cluster has one HSM per AZ), each holding the same store key
  -- an AES-256 key made once and cloned token to token like a domain key (`kmsd dev
  --key-store-token` does it for development clusters).
- KeyStorePassword (AWS: the kmsuser's password, 7-32 characters): the token's user PIN.
  It enters the Raft log only sealed under the domain key, bound to the store id.
- TrustAnchorCertificate: kept and returned as given; kmsd talks to tokens through a local
  PKCS#11 module, not over TLS, so there is no certificate to check it against.
- ConnectionState: ConnectCustomKeyStore logs in to the token on the node that serves it
  and finds the store key, then commits CONNECTED -- or FAILED with ConnectionErrorCode
  CLUSTER_NOT_FOUND (no such token, or no or another store key), INVALID_CREDENTIALS
  (the PIN), USER_LOCKED_OUT or INTERNAL_ERROR. As at AWS the call itself succeeds
  either way. The state is replicated; DisconnectCustomKeyStore commits DISCONNECTED and
  every node closes its session with the token when it applies that (kmsd.node). While a
  store is not connected its keys are Unavailable: cryptographic operations answer
  "KMSInvalidStateException: <key ARN> is unavailable." (AWS key state table, note [11]);
  a connected store whose token one node cannot reach answers KeyUnavailableException
  there (retryable).
- EXTERNAL_KEY_STORE (XKS) is not implemented: UnsupportedOperationException.

Limits as AWS: 10 custom key stores per account and Region (LimitExceededException); names
unique per account and Region (CustomKeyStoreNameInUseException); one store per cluster
(CloudHsmClusterInUseException); only SYMMETRIC_DEFAULT keys in a store.

Never logs, audits or returns the KeyStorePassword.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cluster import commands
from cluster.state import (
    STORE_CONNECTED,
    STORE_DISCONNECTED,
    STORE_FAILED,
    STORE_TYPE_CLOUDHSM,
    CustomKeyStoreRecord,
)
from kmsd.errors import (
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsd.hsm.partition import HsmPartition
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.key_store_tokens import StoreUnreachable, password_aad
from kmsd.service.pagination import page_response, paginate

ORIGIN_AWS_CLOUDHSM = "AWS_CLOUDHSM"
ORIGIN_EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"
KEY_STATE_UNAVAILABLE = "Unavailable"
EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"
MAX_CUSTOM_KEY_STORES = 10  # per account and Region (AWS KMS quotas)
XKS_UNSUPPORTED = ("kmsd does not support external key stores (EXTERNAL_KEY_STORE): its "
                   "custom key stores are PKCS#11 tokens of type AWS_CLOUDHSM.")


def _require_cloudhsm(params: dict[str, Any]) -> None:
    if params.get("CustomKeyStoreType", STORE_TYPE_CLOUDHSM) != STORE_TYPE_CLOUDHSM or any(
            name.startswith("XksProxy") for name in params):
        raise UnsupportedOperationException(XKS_UNSUPPORTED)


def _entry(store: CustomKeyStoreRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "CustomKeyStoreId": store.store_id, "CustomKeyStoreName": store.name,
        "CloudHsmClusterId": store.cluster_id, "TrustAnchorCertificate": store.trust_anchor,
        "ConnectionState": store.connection_state, "CreationDate": store.created_at,
        "CustomKeyStoreType": store.store_type}
    if store.connection_state == STORE_FAILED and store.error_code:
        entry["ConnectionErrorCode"] = store.error_code
    return entry


async def _store(core: ServiceCore, ctx: RequestContext, store_id: str) -> CustomKeyStoreRecord:
    store = core.state.custom_key_stores.get(store_id)
    if store is None:
        await core.catch_up()
        store = core.state.custom_key_stores.get(store_id)
    if store is None or (store.region, store.account_id) != (ctx.region, core.account_id):
        raise CustomKeyStoreNotFoundException(f"Custom key store {store_id} does not exist.")
    return store


async def token_of(core: ServiceCore, ctx: RequestContext, store_id: str) -> HsmPartition:
    """A connected store's token on this node, for CreateKey and GenerateRandom."""
    store = await _store(core, ctx, store_id)
    if store.connection_state != STORE_CONNECTED:
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {store_id} is not connected ({store.connection_state}).")
    try:
        return core.key_stores.partition(store)
    except StoreUnreachable as error:
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {store_id} is connected, but this node cannot use its token: "
            f"{error}.") from None


def _sealed_password(core: ServiceCore, store_id: str, password: str) -> bytes:
    return core.hsm.seal(password.encode(), password_aad(store_id))


async def create_custom_key_store(core: ServiceCore, ctx: RequestContext,
                                  params: dict[str, Any]) -> dict:
    _require_cloudhsm(params)
    await core.authorize(ctx, "CreateCustomKeyStore", None, params)
    for member in ("CloudHsmClusterId", "KeyStorePassword", "TrustAnchorCertificate"):
        if not params.get(member):
            raise ValidationException(f"{member} is required for a custom key store of type "
                                      f"{STORE_TYPE_CLOUDHSM}.")
    store_id = "cks-" + core.random(9).hex()[:17]
    store: CustomKeyStoreRecord = await core.commit(commands.CreateCustomKeyStore(
        store_id=store_id, region=ctx.region, account_id=core.account_id,
        name=params["CustomKeyStoreName"], cluster_id=params["CloudHsmClusterId"],
        trust_anchor=params["TrustAnchorCertificate"],
        sealed_password=_sealed_password(core, store_id, params["KeyStorePassword"]),
        at=core.clock.now(), max_stores=MAX_CUSTOM_KEY_STORES))
    return {"CustomKeyStoreId": store.store_id}


async def describe_custom_key_stores(core: ServiceCore, ctx: RequestContext,
                                     params: dict[str, Any]) -> dict:
    await core.authorize(ctx, "DescribeCustomKeyStores", None, params)
    store_id, name = params.get("CustomKeyStoreId"), params.get("CustomKeyStoreName")
    if store_id and name:
        raise ValidationException("Specify CustomKeyStoreId or CustomKeyStoreName, not both.")
    stores = [s for s in list(core.state.custom_key_stores.values())
              if (s.region, s.account_id) == (ctx.region, core.account_id)]
    if store_id or name:
        stores = [s for s in stores if s.store_id == store_id or s.name == name]
        if not stores:
            raise CustomKeyStoreNotFoundException(
                f"Custom key store {store_id or name} does not exist.")
    page, next_marker = paginate("DescribeCustomKeyStores", stores, lambda s: s.store_id,
                                 params.get("Limit"), params.get("Marker"), default_limit=1000)
    return page_response("CustomKeyStores", [_entry(s) for s in page], next_marker)


async def update_custom_key_store(core: ServiceCore, ctx: RequestContext,
                                  params: dict[str, Any]) -> dict:
    if any(name.startswith("XksProxy") for name in params):
        raise UnsupportedOperationException(XKS_UNSUPPORTED)
    store = await _store(core, ctx, params["CustomKeyStoreId"])
    await core.authorize(ctx, "UpdateCustomKeyStore", None, params)
    cluster_id = params.get("CloudHsmClusterId")
    password = params.get("KeyStorePassword")
    if (cluster_id or password) and store.connection_state != STORE_DISCONNECTED:
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {store.store_id} must be disconnected to change its CloudHSM "
            "cluster or password.")
    if cluster_id and cluster_id != store.cluster_id and store.key_check is not None:
        # AWS: only a cluster that shares the original's backup history, i.e. holds the
        # same keys. Here: a token with the same store key.
        candidate = dataclasses.replace(store, cluster_id=cluster_id)
        if password:
            candidate = dataclasses.replace(
                candidate, sealed_password=_sealed_password(core, store.store_id, password))
        try:
            probe = core.key_stores.connect(candidate)
        except StoreUnreachable as error:
            raise CloudHsmClusterNotFoundException(f"{cluster_id}: {error}.") from None
        finally:
            core.key_stores.close(store.store_id)
        if probe.key_check != store.key_check:
            raise CloudHsmClusterNotRelatedException(
                f"{cluster_id} does not hold the keys of custom key store {store.store_id}.")
    await core.commit(commands.UpdateCustomKeyStore(
        store_id=store.store_id, new_name=params.get("NewCustomKeyStoreName"),
        cluster_id=cluster_id or None,
        sealed_password=(_sealed_password(core, store.store_id, password)
                         if password else None)))
    return {}


async def connect_custom_key_store(core: ServiceCore, ctx: RequestContext,
                                   params: dict[str, Any]) -> dict:
    store = await _store(core, ctx, params["CustomKeyStoreId"])
    await core.authorize(ctx, "ConnectCustomKeyStore", None, params)
    if store.connection_state == STORE_FAILED:
        raise CustomKeyStoreInvalidStateException(
            f"Custom key store {store.store_id} is FAILED: disconnect it, then connect it.")
    if store.connection_state == STORE_CONNECTED:
        return {}
    try:
        probe = core.key_stores.connect(store)
    except StoreUnreachable as error:
        # AWS: the request succeeds; the failure shows in ConnectionState/ConnectionErrorCode.
        await core.commit(commands.SetCustomKeyStoreConnection(
            store.store_id, STORE_FAILED, error_code=error.code))
        return {}
    await core.commit(commands.SetCustomKeyStoreConnection(
        store.store_id, STORE_CONNECTED, key_check=probe.key_check))
    return {}


async def disconnect_custom_key_store(core: ServiceCore, ctx: RequestContext,
                                      params: dict[str, Any]) -> dict:
    store = await _store(core, ctx, params["CustomKeyStoreId"])
    await core.authorize(ctx, "DisconnectCustomKeyStore", None, params)
    await core.commit(commands.SetCustomKeyStoreConnection(store.store_id, STORE_DISCONNECTED))
    return {}


async def delete_custom_key_store(core: ServiceCore, ctx: RequestContext,
                                  params: dict[str, Any]) -> dict:
    store = await _store(core, ctx, params["CustomKeyStoreId"])
    await core.authorize(ctx, "DeleteCustomKeyStore", None, params)
    await core.commit(commands.DeleteCustomKeyStore(store.store_id))
    return {}
