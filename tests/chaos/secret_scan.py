"""Scan data dirs, logs and audit records for plaintexts and data keys a client saw.

Each secret is looked for as raw bytes, as standard base64 (how JSON carries a blob)
and as hex, in every view `stored_views` gives of a file (as stored, gunzipped, and
with pickle's latin-1 encoding undone; the harness's function).
Secrets must be at least 32 bytes with some variety (an all-zero "plaintext" would
match any padding), which the chaos workload's random plaintexts and 32-byte data keys
are.

Searching thousands of secrets through hundreds of megabytes one by one would take
hours, so the scan indexes every 16-byte piece of every encoded secret and looks up
only the file's 16-byte windows at offsets that are multiples of 16: any occurrence
of an encoded secret of 31 bytes or more covers one such window whole. A window hit
is confirmed with a direct search around it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.integration.harness import stored_views

WINDOW = 16
MIN_SECRET = 32


def scannable(secret: bytes) -> bool:
    return len(secret) >= MIN_SECRET and len(set(secret)) >= 8


def _forms(secret: bytes) -> list[tuple[str, bytes]]:
    return [("raw", secret), ("base64", base64.b64encode(secret)),
            ("hex", secret.hex().encode())]


@dataclass
class ScanResult:
    secrets: int = 0
    skipped_short: int = 0
    files: int = 0
    bytes_scanned: int = 0
    hits: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"ok": not self.hits, "secrets": self.secrets,
                "skipped_too_short": self.skipped_short, "files": self.files,
                "bytes_scanned": self.bytes_scanned, "hits": self.hits[:50]}


class SecretIndex:
    def __init__(self, secrets: Iterable[bytes]) -> None:
        self.pieces: dict[bytes, list[tuple[bytes, str]]] = {}
        self.count = self.skipped = 0
        for secret in set(secrets):
            if not scannable(secret):
                self.skipped += 1
                continue
            self.count += 1
            for form, encoded in _forms(secret):
                for i in range(len(encoded) - WINDOW + 1):
                    self.pieces.setdefault(encoded[i:i + WINDOW], []).append((encoded, form))

    def find(self, data: bytes) -> list[tuple[str, int]]:
        """(form, offset) of every encoded secret found in `data`."""
        found: list[tuple[str, int]] = []
        pieces = self.pieces
        for offset in range(0, len(data) - WINDOW + 1, WINDOW):
            candidates = pieces.get(data[offset:offset + WINDOW])
            if not candidates:
                continue
            for encoded, form in candidates:
                lo = max(0, offset - len(encoded))
                at = data.find(encoded, lo, offset + WINDOW + len(encoded))
                if at >= 0:
                    found.append((form, at))
        return found


def scan(paths: Iterable[str], secrets: Iterable[bytes],
         extra: dict[str, bytes] | None = None) -> ScanResult:
    """Scan every file under `paths` (files or folders) and the named `extra` blobs."""
    index = SecretIndex(secrets)
    result = ScanResult(secrets=index.count, skipped_short=index.skipped)
    targets: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            targets.append(path)
        for directory, _, names in os.walk(path):
            targets += [os.path.join(directory, name) for name in sorted(names)]
    for target in targets:
        if not os.path.isfile(target) or os.path.islink(target):
            continue
        result.files += 1
        for view in stored_views(target):
            result.bytes_scanned += len(view)
            for form, offset in index.find(view):
                result.hits.append(f"{target}: a secret as {form} at offset {offset}")
    for name, data in (extra or {}).items():
        result.files += 1
        result.bytes_scanned += len(data)
        for form, offset in index.find(data):
            result.hits.append(f"{name}: a secret as {form} at offset {offset}")
    return result
