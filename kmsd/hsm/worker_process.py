"""The HSM helper process: slow token calls run here, never on the node's event loop.

Why a process and not a thread: PKCS#11 through python-pkcs11 on SoftHSM2 is
not thread-safe (FACTS.md §0.1), so a second thread may not touch the token
while the event loop uses it inline. A process has its own C_Initialize and
its own login (FACTS.md §0.6 -- login state is per application), on the same
token: SoftHSM2 keeps token objects in files that both processes read, and
everything kmsd uses at run time is a session object that each process
unwraps for itself. The domain keys are found by their labels, exactly as the
node finds them; every call carries the node's active domain-key generation,
so that what the child wraps is wrapped under the generation the replicated
state names.

What it owns: one `ProcessPoolExecutor(max_workers=1)` with the "spawn" start
method (a fork would copy the parent's PKCS#11 state), whose initializer
opens the partition from the node's configuration; an async call per
operation (`loop.run_in_executor`); replacing the process when it dies (the
call that saw it die fails, the next one gets a fresh process).

The child ends itself within a second of the node's death, however the node died.

What it never does: log, or raise with, key material, plaintext, messages or
signatures; keep the PIN anywhere but the child's memory (it reaches the
child through the executor's pipe, never a command line or the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from kmsd.hsm.asymmetric import AsymmetricKeys, GeneratedKey, MessageType
from kmsd.hsm.capabilities import TokenCapabilities
from kmsd.hsm.data_key_pairs import DataKeyPair, generate_data_key_pair
from kmsd.hsm.key_import import ImportedMaterial, import_material
from kmsd.hsm.partition import HsmError, HsmPartition

log = structlog.get_logger("kmsd.hsm.worker")

T = TypeVar("T")
# How often the child checks that the node that spawned it is still alive.
PARENT_CHECK_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerSettings:
    """What the child needs to open the same token as the node."""

    module_path: str
    token_label: str
    pin: str = field(repr=False)
    softhsm2_conf: str | None = None
    # The node's probe result: the child uses it instead of probing again.
    capabilities: TokenCapabilities | None = None


# -- the child process ----------------------------------------------------------------------
# Module-level state of the child: set once by `_child_init`, used by the calls below.

_child_keys: AsymmetricKeys | None = None


def _child_init(settings: WorkerSettings, node_pid: int) -> None:
    global _child_keys
    # The node may have died while this process was still starting (importing, ~0.5 s):
    # compare with the pid the node gave, not with whatever parent this process has now.
    threading.Thread(target=_exit_with_parent, args=(node_pid,), daemon=True,
                     name="parent-watch").start()
    if settings.softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = settings.softhsm2_conf
    partition = HsmPartition(settings.module_path, settings.token_label, settings.pin)
    _child_keys = AsymmetricKeys(partition, settings.capabilities)


def _exit_with_parent(parent_pid: int) -> None:
    """End the child when the node is gone. A node killed with SIGKILL cannot shut the pool
    down, and the child never sees EOF on its call queue (it holds the queue's write end
    itself), so without this it would live on, logged in to the token, as an orphan."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _keys() -> AsymmetricKeys:
    if _child_keys is None:
        raise HsmError("the HSM helper process has no open partition")
    return _child_keys


def _child_with_generation(generation: int, function: Callable[..., T], *args: Any) -> T:
    partition = _keys().partition
    partition.generation_source = lambda: generation
    return function(*args)


def _child_ping() -> int:
    _keys()
    return os.getpid()


def _child_generate(key_spec: str) -> GeneratedKey:
    return _keys().generate(key_spec)


def _child_sign(wrapped: bytes, key_spec: str, algorithm: str, message: bytes,
                message_type: MessageType) -> bytes:
    return _keys().sign(wrapped, key_spec, algorithm, message, message_type)


def _child_decrypt(wrapped: bytes, key_spec: str, algorithm: str, ciphertext: bytes) -> bytes:
    return _keys().decrypt(wrapped, key_spec, algorithm, ciphertext)


def _child_data_key_pair(key_pair_spec: str) -> DataKeyPair:
    return generate_data_key_pair(_keys().partition, key_pair_spec)


def _child_import(path: str, wrapping_algorithm: str, wrapped_wrapping_private: bytes,
                  wrapping_key_spec: str, encrypted_key_material: bytes,
                  key_spec: str) -> ImportedMaterial:
    return import_material(_keys().partition, path, wrapping_algorithm,
                           wrapped_wrapping_private, wrapping_key_spec, encrypted_key_material,
                           key_spec)


def _child_evict(wrapped: tuple[bytes, ...]) -> int:
    keys = _keys()
    for blob in wrapped:
        keys.evict(blob)
    return keys.cached_handles


# -- the node side ----------------------------------------------------------------------------

class HsmWorkerProcess:
    """One spawned helper process with its own login to the node's token.

    `start()` spawns it (the login happens in the background, so start-up is not delayed);
    `stop()` ends it. Every call is awaitable and leaves the event loop free meanwhile.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._executor: ProcessPoolExecutor | None = None
        self._warmup: Future[int] | None = None
        self.restarts = 0
        # The node's active domain-key generation, sent with every call.
        self.generation_source: Callable[[], int] = lambda: 1

    @property
    def token_label(self) -> str:
        return self._settings.token_label

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_child_init,
                                   initargs=(self._settings, os.getpid()))

    def start(self) -> None:
        """Spawn the process and let it log in; returns at once."""
        if self._executor is None:
            self._executor = self._new_executor()
            self._warmup = self._executor.submit(_child_ping)
            self._warmup.add_done_callback(self._warmed_up)

    def _warmed_up(self, future: Future[int]) -> None:
        # Runs on the executor's management thread: log only.
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("hsm_worker_failed_to_start", token=self.token_label,
                      error=type(error).__name__)
        else:
            log.info("hsm_worker_ready", token=self.token_label, pid=future.result())

    async def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # shutdown() waits for a running call (an RSA key generation can take seconds).
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True))

    async def ping(self) -> int:
        """The child's pid once it is logged in (raises if it could not log in)."""
        return await self._call(_child_ping)

    async def generate(self, key_spec: str) -> GeneratedKey:
        return await self._call(_child_generate, key_spec)

    async def sign(self, wrapped: bytes, key_spec: str, algorithm: str, message: bytes,
                   message_type: MessageType) -> bytes:
        return await self._call(_child_sign, wrapped, key_spec, algorithm, message,
                                message_type)

    async def decrypt(self, wrapped: bytes, key_spec: str, algorithm: str,
                      ciphertext: bytes) -> bytes:
        return await self._call(_child_decrypt, wrapped, key_spec, algorithm, ciphertext)

    async def data_key_pair(self, key_pair_spec: str) -> DataKeyPair:
        return await self._call(_child_data_key_pair, key_pair_spec)

    async def import_material(self, path: str, wrapping_algorithm: str,
                              wrapped_wrapping_private: bytes, wrapping_key_spec: str,
                              encrypted_key_material: bytes,
                              key_spec: str) -> ImportedMaterial:
        """ImportKeyMaterial's RSA unwrap (kmsd.hsm.key_import), off the event loop."""
        return await self._call(_child_import, path, wrapping_algorithm,
                                wrapped_wrapping_private, wrapping_key_spec,
                                encrypted_key_material, key_spec)

    async def evict(self, wrapped: tuple[bytes, ...]) -> int:
        """Drop the child's cached handles for these blobs; returns how many it still holds."""
        return await self._call(_child_evict, wrapped)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise HsmError("the HSM helper process is not running")
        executor = self._executor
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, _child_with_generation, self.generation_source(), function, *args)
        except BrokenProcessPool:
            # The child died (killed, crashed in the token library). This call fails; the next
            # one gets a fresh process with a fresh login.
            if self._executor is executor:
                self.restarts += 1
                log.error("hsm_worker_died", token=self.token_label, restarts=self.restarts)
                self._executor = self._new_executor()
                with contextlib.suppress(Exception):
                    executor.shutdown(wait=False, cancel_futures=True)
            raise HsmError("the HSM helper process stopped during the call; retry") from None
