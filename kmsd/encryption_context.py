"""Canonical encoding of an encryption context, bound into GCM as AAD.

The encoding is injective: a count, then each pair sorted by the UTF-8 bytes of
its key, each string length-prefixed. Two contexts give the same bytes only if
they are equal, exactly and case-sensitively, as AWS requires for Decrypt.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping


def canonical(context: Mapping[str, str] | None) -> bytes:
    if not context:
        return struct.pack(">I", 0)
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    parts = [struct.pack(">I", len(pairs))]
    for key, value in pairs:
        parts.append(struct.pack(">I", len(key)) + key + struct.pack(">I", len(value)) + value)
    return b"".join(parts)
