"""What every process that serves the KMS API builds from a node's config: the clock, its own
login to the node's HSM token, the service layer over a copy of the state, the asymmetric
helper, the effects of applied commands, and SigV4 authentication. A node's primary builds it
over its Raft node (kmsd.node), an API worker over the primary (kmsd.api_workers.worker).
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass

from cluster.raft_node import RaftNode
from cluster.state import KmsState
from kmsd.api.protocol import Authenticator
from kmsd.auth.credentials import CredentialStore
from kmsd.auth.sigv4 import SigV4Verifier
from kmsd.clock import Clock, OffsetClock, SystemClock
from kmsd.config import NodeConfig
from kmsd.hsm.partition import HsmError, HsmPartition
from kmsd.hsm.worker_process import WorkerSettings
from kmsd.replica_effects import ReplicaEffects
from kmsd.service.asymmetric_hsm import AsymmetricHsm
from kmsd.service.core import ServiceCore
from kmsd.tls import CertificatePaths, server_context


@dataclass
class ServingParts:
    clock: Clock
    hsm: HsmPartition
    core: ServiceCore
    asymmetric: AsymmetricHsm
    effects: ReplicaEffects
    credentials: CredentialStore
    authenticator: Authenticator

    def cached_handles(self) -> int:
        """Unwrapped keys this process holds as HSM session objects (on its event loop)."""
        return self.hsm.cached_handles + self.asymmetric.router.inline.cached_handles


def serving_parts(config: NodeConfig, state: KmsState, raft: RaftNode,
                  clock: Clock | None = None) -> ServingParts:
    if config.softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm2_conf
    clock = clock or (OffsetClock(config.clock_offset_file)
                      if config.clock_offset_file else SystemClock())
    hsm = HsmPartition(config.hsm_module, config.token_label, config.pin.read("HSM PIN"))
    if not hsm.has_domain_key():
        raise HsmError(f"token {config.token_label!r} holds no domain key")
    # New blobs are wrapped under the generation the replicated state calls active.
    hsm.generation_source = lambda: state.active_generation
    core = ServiceCore(state, raft, hsm, clock, config.account_id, config.regions)
    core.allow_host_oaep_decoding = config.allow_host_oaep_decoding
    # Asymmetric and HMAC keys: cheap token calls inline, slow ones (RSA) in an HSM helper
    # process with its own login to the same token.
    asymmetric = AsymmetricHsm.for_node(core, hsm, WorkerSettings(
        config.hsm_module, config.token_label, config.pin.read("HSM PIN"),
        config.softhsm2_conf))
    credentials = CredentialStore(state, hsm)
    authenticator = Authenticator(
        # SigV4 checks skew against real time, never the (test-adjustable) proposer clock.
        SigV4Verifier("kms", frozenset(config.regions), clock=time.time), credentials)
    return ServingParts(clock, hsm, core, asymmetric, ReplicaEffects(core, hsm, asymmetric),
                        credentials, authenticator)


def tls_server_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The HTTPS context of the node's listeners, or None to serve HTTP."""
    if not (config.tls_certificate and config.tls_key):
        return None
    return server_context(CertificatePaths(config.tls_certificate, config.tls_key))
