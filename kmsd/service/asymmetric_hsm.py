"""The node's asymmetric HSM machinery as the service layer sees it.

Owns: `AsymmetricHsm` -- the router between inline token calls and the HSM helper
process (kmsd.hsm.asymmetric_router), the helper process's life (started and stopped
with the node), and a periodic pruning that destroys cached private-key handles of
keys deleted from the cluster; `router_of(core)`, how an operation module finds it;
`hsm_errors()`, which turns HSM-layer failures into AWS errors; `capabilities_report`, the
probe's table for `kmsctl hsm capabilities`.

Never logs key material, plaintext, messages or signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import structlog

from kmsd.errors import (
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    KMSInternalException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsd.hsm.asymmetric import AsymmetricKeys, InvalidInput, UnsupportedByToken
from kmsd.hsm.asymmetric_router import SLOW_RSA_BITS, AsymmetricRouter
from kmsd.hsm.capabilities import RSA_KEY_SPECS
from kmsd.hsm.data_key_pairs import UnsupportedKeyPairSpec
from kmsd.hsm.key_import import ImportRefused, InvalidMaterial, wrapping_rows
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition
from kmsd.hsm.worker_process import HsmWorkerProcess, WorkerSettings
from kmsd.service.core import ServiceCore
from kmsd.service.key_specs import SYMMETRIC_DEFAULT

log = structlog.get_logger("kmsd.asymmetric")

PRUNE_INTERVAL_SECONDS = 5.0

_ROUTERS: weakref.WeakKeyDictionary[ServiceCore, AsymmetricRouter] = weakref.WeakKeyDictionary()


class AsymmetricHsm:
    """Router + helper process + pruning, for one node."""

    def __init__(self, core: ServiceCore, router: AsymmetricRouter,
                 prune_interval: float = PRUNE_INTERVAL_SECONDS) -> None:
        self.core = core
        self.router = router
        self.prune_interval = prune_interval
        self._task: asyncio.Task[None] | None = None
        _ROUTERS[core] = router

    @classmethod
    def for_node(cls, core: ServiceCore, partition: HsmPartition,
                 settings: WorkerSettings | None) -> AsymmetricHsm:
        """Probes the token (once, ~35-130 ms) and prepares the helper process with the
        probe's result; `settings` None keeps every call inline."""
        inline = AsymmetricKeys(partition)
        worker = None
        if settings is not None:
            worker = HsmWorkerProcess(WorkerSettings(
                settings.module_path, settings.token_label, settings.pin,
                settings.softhsm2_conf, inline.capabilities))
            worker.generation_source = lambda: partition.active_generation
        return cls(core, AsymmetricRouter(inline, worker))

    def start(self) -> None:
        """Spawn the helper process (it logs in in the background) and start pruning."""
        if self.router.worker is not None:
            self.router.worker.start()
        if self._task is None:
            self._task = asyncio.create_task(self._prune_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.router.worker is not None:
            await self.router.worker.stop()
        self.router.inline.close()

    def live_blobs(self) -> set[bytes]:
        """Wrapped private/secret keys of every asymmetric and HMAC key still in the state."""
        return {backing.wrapped for record in list(self.core.state.keys.values())
                if record.key_spec != SYMMETRIC_DEFAULT for backing in record.backing_keys}

    async def prune_once(self) -> int:
        if not self.router.tracks_any():
            return 0
        return await self.router.prune(self.live_blobs())

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                dropped = await self.prune_once()
            except HsmError as error:
                log.warning("asymmetric_prune_failed", error=type(error).__name__)
                continue
            if dropped:
                log.info("asymmetric_handles_pruned", count=dropped)


def router_of(core: ServiceCore) -> AsymmetricRouter:
    """The router attached to this core; a core built without a node (tools, tests of the
    service layer) gets an inline-only router on first use."""
    router = _ROUTERS.get(core)
    if router is None:
        router = _ROUTERS[core] = AsymmetricRouter(AsymmetricKeys(core.hsm))
    return router


@contextlib.contextmanager
def hsm_errors() -> Iterator[None]:
    """HSM-layer failures as the AWS errors a caller gets. No message carries key material."""
    try:
        yield
    except (UnsupportedByToken, UnsupportedKeyPairSpec, ImportRefused) as error:
        raise UnsupportedOperationException(str(error)) from None
    except InvalidMaterial as error:
        # ImportKeyMaterial: AWS answers material that "does not meet expectations" so.
        raise IncorrectKeyMaterialException(f"{error}.") from None
    except InvalidInput as error:
        raise ValidationException(str(error)) from None
    except HsmAuthenticationFailed:
        raise InvalidCiphertextException() from None
    except HsmError as error:
        raise KMSInternalException(f"The HSM could not complete the request: {error}.") from None


def capabilities_report(core: ServiceCore) -> dict[str, Any]:
    """What this node's token does for each KMS key spec and algorithm (`kmsctl hsm
    capabilities`): the probe's table plus where the slow calls run."""
    router = router_of(core)
    caps = router.capabilities
    worker = router.worker
    return {
        "token_label": caps.token_label, "token_manufacturer": caps.token_manufacturer.strip(),
        "token_model": caps.token_model.strip(), "token_firmware": caps.token_firmware,
        "library": caps.library, "probe_seconds": round(caps.probe_seconds, 3),
        "capabilities": [{"kind": kind, "name": name, "path": path, "detail": detail}
                         for kind, name, path, detail in caps.rows() + wrapping_rows(caps)],
        "helper_process": {
            "enabled": worker is not None,
            "restarts": worker.restarts if worker is not None else 0,
            "runs": [f"RSA key generation ({', '.join(RSA_KEY_SPECS)})",
                     "RSA data key pair generation",
                     f"RSA sign and decrypt with {SLOW_RSA_BITS}-bit keys and larger",
                     "ImportKeyMaterial (RSA unwrap of imported key material)"],
        },
    }
