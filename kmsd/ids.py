"""Random version-4 UUID strings for request and event ids, cheaper than `str(uuid.uuid4())`.

Owns: `new_uuid`. Every API request takes two (its request id, AWS-style a UUID, and its audit
event id); `str(uuid.uuid4())` costs a getrandom system call, a `UUID` object and its
formatting each time, a measurable share of a request's CPU. Here the random bytes are drawn
from `os.urandom` (the same CSPRNG uuid4 uses) a batch at a time and formatted in bulk; a call
then only pops a ready string.

The ids are what uuid4 makes: 122 random bits with the version (4) and RFC 4122 variant bits
set, lowercase `8-4-4-4-12` hex. They are not a counter: an id says nothing about the ids
before or after it, so they remain as unguessable as uuid4's.

Never does: hand out an id twice. `list.pop` is atomic, so threads never share one; a forked
child drops the ids its parent had drawn but not used (they would repeat in both processes).
"""

from __future__ import annotations

import os

_BATCH = 256  # ids per urandom call: 4 KiB of randomness, amortises the call and the loop
# The variant nibble is 10xx: keep the random low two bits (as uuid4 does).
_VARIANT = {f"{n:x}": "89ab"[n & 3] for n in range(16)}

_pool: list[str] = []


def _draw() -> list[str]:
    raw = os.urandom(16 * _BATCH).hex()
    variant = _VARIANT
    return [f"{raw[i:i + 8]}-{raw[i + 8:i + 12]}-4{raw[i + 13:i + 16]}-"
            f"{variant[raw[i + 16]]}{raw[i + 17:i + 20]}-{raw[i + 20:i + 32]}"
            for i in range(0, 32 * _BATCH, 32)]


def new_uuid() -> str:
    """A fresh random UUID string, formatted like `str(uuid.uuid4())`."""
    while True:
        try:
            return _pool.pop()
        except IndexError:  # empty (another thread may empty a refill first: draw again)
            _pool.extend(_draw())


os.register_at_fork(after_in_child=_pool.clear)
