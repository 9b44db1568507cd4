#!/usr/bin/env python3
"""How long a Raft log compaction keeps the rest of a node's process from running.

After a snapshot pysyncobj drops the compacted entries from its file journal
(`deleteEntriesTo`) in a tick, which in kmsd runs on the node's event loop (and
held the GIL on a tick thread of its own before). kmsd's
`cluster.journal.ScrubbingFileJournal` also overwrites the dropped bytes with zeros
(they may hold wrapped material of deleted keys). While the tick runs, the loop serves
nothing else.

This fills a journal with `--entries` entries of `--entry-bytes` bytes (AppendAudit
entries of a cluster under load are 3-16 KB), then times `deleteEntriesTo` while a
second thread sleeps 0.1 ms in a loop and records the longest gap between its
wake-ups: the longest time it could not get the GIL (or a core). The reference, in
the same run, is pysyncobj's own FileJournal, which rewrites the kept entries and
zeroes nothing. Each figure is the median of `--repeats`.

    .venv/bin/python bench/journal_compaction.py
    .venv/bin/python bench/journal_compaction.py --entry-bytes 3000,12000

Writes bench/results/journal-compaction-<date>.json and a PNG beside it (or into
--out-dir). It reports, it never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import benchlib
from pysyncobj.journal import FileJournal

from cluster.journal import ScrubbingFileJournal

JOURNALS: dict[str, type[FileJournal]] = {
    "kmsd ScrubbingFileJournal": ScrubbingFileJournal,
    "pysyncobj FileJournal (reference, zeroes nothing)": FileJournal,
}
KEPT_ENTRIES = 10


class GapSampler:
    """A thread that sleeps 0.1 ms at a time and keeps the longest gap between wake-ups."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while self._running:
            time.sleep(0.0001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> GapSampler:
        self._thread.start()
        time.sleep(0.02)
        self.longest = 0.0
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.02)
        self._running = False
        self._thread.join()


def one_compaction(journal_type: type[FileJournal], path: str, entries: int,
                   entry_bytes: int) -> tuple[float, float]:
    """(seconds deleteEntriesTo took, longest gap another thread saw meanwhile)."""
    log = journal_type(path)
    command = os.urandom(entry_bytes)
    for index in range(1, entries + 1):
        log.add(command, index, 1)
    with GapSampler() as sampler:
        started = time.perf_counter()
        log.deleteEntriesTo(entries - KEPT_ENTRIES)
        took = time.perf_counter() - started
    log._destroy()
    for leftover in (path, path + ".meta"):
        if os.path.exists(leftover):
            os.remove(leftover)
    return took, sampler.longest


def measure(entries: int, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as workdir:
        for entry_bytes in sizes:
            for name, journal_type in JOURNALS.items():
                runs = [one_compaction(journal_type, os.path.join(workdir, "raft.journal"),
                                       entries, entry_bytes) for _ in range(repeats)]
                rows.append({
                    "journal": name, "entries": entries, "entry_bytes": entry_bytes,
                    "dropped_mb": round((entries - KEPT_ENTRIES) * entry_bytes / 1e6, 1),
                    "compaction_ms": round(statistics.median(r[0] for r in runs) * 1e3, 2),
                    "longest_gap_ms": round(statistics.median(r[1] for r in runs) * 1e3, 2),
                    "runs": [[round(a * 1e3, 2), round(b * 1e3, 2)] for a, b in runs],
                })
                print(f"{entry_bytes:>6} B x {entries}: {name}: compaction "
                      f"{rows[-1]['compaction_ms']} ms, longest gap "
                      f"{rows[-1]['longest_gap_ms']} ms", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["entry_bytes"] for row in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(JOURNALS)
    for offset, name in enumerate(JOURNALS):
        gaps = [next(r["longest_gap_ms"] for r in rows
                     if r["journal"] == name and r["entry_bytes"] == size) for size in sizes]
        ax.bar([i + offset * width for i in range(len(sizes))], gaps, width, label=name)
    ax.set_xticks([i + width / 2 for i in range(len(sizes))],
                  [f"{size:,} B entries" for size in sizes])
    ax.set_ylabel("longest gap of another thread (ms)")
    ax.set_title(f"Log compaction of {rows[0]['entries']:,} entries: how long it stalls others")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000,
                        help="entries in the journal (kmsd compacts at 2000 by default)")
    parser.add_argument("--entry-bytes", default="3000,12000",
                        help="comma-separated entry sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    sizes = [int(size) for size in args.entry_bytes.split(",")]
    date, stamp = benchlib.now_stamp()
    rows = measure(args.entries, sizes, args.repeats)
    report = {"machine": benchlib.machine_info(), "versions": benchlib.versions(),
              "date": stamp, "loadavg": benchlib.loadavg(), "repeats": args.repeats,
              "results": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"journal-compaction-{date}")
    with open(base + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    if not args.no_plot:
        plot(rows, base + ".png")
    print(f"wrote {base}.json")


if __name__ == "__main__":
    main()
