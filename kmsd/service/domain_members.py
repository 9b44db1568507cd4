"""What a member does with its own token during a domain-key rotation.

The leader (kmsd.service.domain_rotation) drives a rotation; each member,
through peer-authenticated `/v1/internal/domain/*` routes and at start-up:

- makes a transport key for a generation the replicated state names
  (`transport_point`) and accepts that generation wrapped under it
  (`accept`), keeping it only if its check value is the one in the state;
- brings its token in line with the state (`reconcile`): destroys retired
  and abandoned generations, and a later generation whose check value is not
  the state's (left by a leader that made it and died before proposing it),
  then reports what it holds. A generation-1 key of another cluster is never
  touched: the node refuses to serve instead.

A member only ever receives domain keys: nothing here wraps one for anyone
(the join path and the leader's push are the only donors, and both send to
members named by the replicated state). Never logs or returns key material.
"""

from __future__ import annotations

import structlog

from cluster import domain_generations as dg
from kmsd import domain_blob
from kmsd.errors import KMSInvalidStateException, ValidationException
from kmsd.hsm import domain_clone
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition
from kmsd.service.core import ServiceCore

log = structlog.get_logger("kmsd.domain")


async def _generation(core: ServiceCore, number: int) -> dg.DomainGeneration:
    generation = core.state.domain_generations.get(number)
    if generation is None:
        # Begun a moment ago through another node: catch up with the log once.
        await core.catch_up()
        generation = core.state.domain_generations.get(number)
    if generation is None or generation.state not in (dg.PENDING, *dg.LIVE):
        raise ValidationException(f"Domain-key generation {number} is not in use.")
    return generation


async def transport_point(core: ServiceCore, number: int) -> bytes:
    await _generation(core, number)
    return domain_clone.make_transport_key(
        core.hsm, label=domain_clone.rotation_transport_label(number), for_join=False)


async def accept(core: ServiceCore, number: int, donor_point: bytes, wrapped: bytes) -> str:
    """Unwrap generation `number` into the token; returns its check value once it is the
    state's. A copy it holds already is kept if it matches, replaced if it does not."""
    generation = await _generation(core, number)
    hsm = core.hsm
    label = domain_clone.rotation_transport_label(number)
    held = hsm.held_generations().get(number)
    if held == generation.check:
        domain_clone.discard_transport_key(hsm, label)
        return held
    if held is not None:
        _destroy(hsm, number, "check value differs from the cluster's")
    try:
        domain_clone.accept_domain_keys(hsm, donor_point, {number: wrapped}, label=label)
    except (HsmError, HsmAuthenticationFailed):
        raise KMSInvalidStateException(
            f"Could not unwrap domain-key generation {number}.") from None
    check = hsm.domain_key_check_value(number)
    if check != generation.check:
        _destroy(hsm, number, "received key does not match the cluster's check value")
        raise KMSInvalidStateException(f"The domain key received for generation {number} does not "
                               "match the cluster's check value.")
    log.info("domain_generation_received", generation=number, check=check)
    return check


def reconcile(state_generations: dict[int, dg.DomainGeneration],
              hsm: HsmPartition) -> dict[int, str]:
    """Destroy what the token must no longer hold; returns generation -> check it holds."""
    held = hsm.held_generations()
    for number, check in sorted(held.items()):
        generation = state_generations.get(number)
        if generation is None:
            continue  # not proposed yet (this node may be making it right now)
        if number == domain_blob.FIRST_GENERATION and check != generation.check:
            continue  # another cluster's key: never destroyed, the node refuses to serve
        if generation.state in (dg.RETIRED, dg.ABANDONED):
            _destroy(hsm, number, generation.state)
            del held[number]
        elif check != generation.check:
            _destroy(hsm, number, "check value differs from the cluster's")
            del held[number]
    return held


def missing_live(state_generations: dict[int, dg.DomainGeneration],
                 held: dict[int, str]) -> list[int]:
    """Live generations this token lacks (or holds another key under)."""
    return [g.generation for g in sorted(state_generations.values(),
                                         key=lambda g: g.generation)
            if g.state in dg.LIVE and held.get(g.generation) != g.check]


def _destroy(hsm: HsmPartition, number: int, why: str) -> None:
    if hsm.destroy_generation(number):
        log.info("domain_generation_destroyed", generation=number, reason=why)
