"""Tests for kmsd.audit.segments: writing, rotating, reading, verifying and exporting segments.

The tamper properties (hypothesis) take a pristine multi-segment directory, damage a copy --
one flipped byte anywhere, one removed record, two swapped records -- and require
verify_directory to name the record that was damaged, by file and line and position. A torn
final line (a crash mid-append) must come out as torn, not as tampering.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.audit import segments
from kmsd.audit.chain import AuditChain, AuditEntry, ChainedRecord, ChainHead, Problem
from kmsd.audit.segments import (
    ChainContinuityError,
    CorruptSegmentError,
    SegmentWriter,
    export_jsonl,
    list_segments,
    read_records,
    segment_name,
    verify_directory,
)
from tests.unit.audit.support import EVENT_TIME, chained

N = 12
MAX_BYTES = 2500  # ~3 records per segment


def write_chain(directory: Path, records: list[ChainedRecord], batch: int = 3) -> None:
    with SegmentWriter(directory, max_bytes=MAX_BYTES) as writer:
        for start in range(0, len(records), batch):
            writer.append(records[start:start + batch])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AuditChain,
                                                                 list[ChainedRecord]]:
    directory = tmp_path_factory.mktemp("pristine")
    chain, records = chained(N)
    write_chain(directory, records)
    return directory, chain, records


@pytest.fixture
def copy(pristine: tuple[Path, AuditChain, list[ChainedRecord]],
         tmp_path: Path) -> Path:
    target = tmp_path / "audit"
    shutil.copytree(pristine[0], target)
    return target


def layout(directory: Path) -> list[tuple[str, int]]:
    """(file, line) of every record position, in order."""
    return [(p.name, number) for p in list_segments(directory)
            for number, _ in enumerate(p.read_bytes().splitlines(), start=1)]


def clone(source: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "audit"
        shutil.copytree(source, target)
        yield target


# -- writing and reading --------------------------------------------------------------------------

def test_rotation_names_and_sizes(pristine: tuple[Path, AuditChain, list[ChainedRecord]]
                                  ) -> None:
    directory, _, records = pristine
    files = list_segments(directory)
    assert len(files) >= 3
    firsts = []
    for path in files:
        lines = path.read_bytes().splitlines(keepends=True)
        first = json.loads(lines[0])["seq"]
        firsts.append(first)
        assert path.name == segment_name(first) == f"seg-{first:020d}.jsonl"
        assert path.stat().st_size <= MAX_BYTES or len(lines) == 1
    assert firsts[0] == 1 and firsts == sorted(firsts)
    # Every line is exactly the record's canonical line.
    assert b"".join(p.read_bytes() for p in files) == b"".join(r.to_line() for r in records)


def test_reading_spans_segments(pristine: tuple[Path, AuditChain, list[ChainedRecord]]) -> None:
    directory, chain, records = pristine
    reader = read_records(directory)
    assert list(reader) == records
    assert reader.torn is None
    result = verify_directory(directory, expected_head=chain.head)
    assert result.ok and result.records == N and result.head == chain.head
    assert result.torn is None


@pytest.fixture(scope="module")
def one_big_segment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path,
                                                                        list[ChainedRecord]]:
    directory = tmp_path_factory.mktemp("big")
    _, records = chained(300)
    with SegmentWriter(directory) as writer:
        writer.append(records)
    assert len(list_segments(directory)) == 1
    return directory, records


@settings(max_examples=60, deadline=None)
@given(after=st.integers(0, N + 2))
def test_reading_after_a_seq_across_segments(
        pristine: tuple[Path, AuditChain, list[ChainedRecord]], after: int) -> None:
    directory, _, records = pristine
    assert list(read_records(directory, after)) == records[after:]


@settings(max_examples=80, deadline=None)
@given(after=st.integers(0, 302))
def test_reading_after_a_seq_within_one_segment(
        one_big_segment: tuple[Path, list[ChainedRecord]], after: int) -> None:
    directory, records = one_big_segment
    assert list(read_records(directory, after)) == records[after:]


def test_a_page_at_the_end_parses_only_what_it_returns(
        one_big_segment: tuple[Path, list[ChainedRecord]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory, records = one_big_segment
    parsed = []
    parse = segments._parse_line
    monkeypatch.setattr(segments, "_parse_line",
                        lambda body, file, line: parsed.append(line) or parse(body, file, line))
    assert list(read_records(directory, 295)) == records[295:]
    assert parsed == [296, 297, 298, 299, 300]


def test_reading_after_a_seq_names_damage_by_its_line(copy: Path) -> None:
    names = layout(copy)
    target = 9  # a record in a later segment, not its first line
    file, line = names[target]
    path = copy / file
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].replace(b'"eventName":', b'"eventname":', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(CorruptSegmentError) as raised:
        list(read_records(copy, target - 1))
    assert (raised.value.file, raised.value.line) == (file, line)
    assert [r.seq for r in read_records(copy, target + 1)] == list(range(target + 2, N + 1))


def test_reading_after_a_seq_stops_at_a_torn_tail(copy: Path) -> None:
    last = list_segments(copy)[-1]
    last.write_bytes(last.read_bytes()[:-20])
    reader = read_records(copy, N - 3)
    assert [r.seq for r in reader] == [N - 2, N - 1]
    assert reader.torn is not None and reader.torn.file == last.name


def test_one_fsync_per_file_written_per_append(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, records = chained(6)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(segments.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with SegmentWriter(tmp_path, max_bytes=10**6) as writer:
        synced.clear()
        writer.append(records[:1])  # creates the first segment: directory + file
        assert len(synced) == 2
        synced.clear()
        writer.append(records[1:6])  # one batch, one fsync
        assert len(synced) == 1


def test_reopen_continues_and_ignores_replays(tmp_path: Path) -> None:
    chain, records = chained(9)
    write_chain(tmp_path, records[:5])
    with SegmentWriter(tmp_path, max_bytes=MAX_BYTES) as writer:
        assert writer.head == ChainHead(5, records[4].hash)
        assert writer.recovered_torn is None
        assert writer.append(records[:5]) == 0  # a Raft replay after restart
        assert writer.append(records[3:7]) == 2  # overlapping: only the new ones
        assert writer.append(records[7:]) == 2
        assert writer.head == chain.head
    assert list(read_records(tmp_path)) == records
    assert verify_directory(tmp_path, expected_head=chain.head).ok


def test_writer_refuses_records_that_break_the_chain(tmp_path: Path) -> None:
    _, records = chained(6)
    _, other = chained(6, node="node-b")
    with SegmentWriter(tmp_path) as writer:
        writer.append(records[:3])
        with pytest.raises(ChainContinuityError):
            writer.append(records[4:])  # seq 4 missing
        with pytest.raises(ChainContinuityError):
            writer.append(other[3:4])  # seq 4 of a different chain
        with pytest.raises(ChainContinuityError):
            writer.append(other[2:3])  # seq 3 already on disk, different hash
        assert writer.append(records[3:]) == 3
    assert verify_directory(tmp_path).ok


def test_continuity_is_checked_within_a_batch_too(tmp_path: Path) -> None:
    _, records = chained(6)
    _, other = chained(6, node="node-b")
    # An empty directory takes any first record, and the rest of its batch must follow it.
    with SegmentWriter(tmp_path / "gap") as writer:
        with pytest.raises(ChainContinuityError, match="seq 5 does not continue .* seq 3"):
            writer.append([records[2], records[4]])
        assert writer.head is None
    for name, batch, message in (("fork", [records[2], other[2]], "different hash"),
                                 ("link", [records[2], other[3]], "seq 4 does not continue")):
        with SegmentWriter(tmp_path / name) as writer, pytest.raises(ChainContinuityError,
                                                                     match=message):
            writer.append(batch)
    # A record repeated within a batch is a replay like any other.
    with SegmentWriter(tmp_path / "repeat") as writer:
        assert writer.append([records[2], records[3], records[3], records[2], records[4]]) == 3
        assert writer.head == ChainHead(5, records[4].hash)
        assert writer.append(records[:5]) == 0
        assert writer.append([other[3]]) == 0  # below the head: only the head's hash is known
        with pytest.raises(ChainContinuityError, match="seq 5 is already on disk"):
            writer.append([other[4]])
        assert writer.append(records) == 1
    assert list(read_records(tmp_path / "repeat")) == records[2:]


def test_a_fresh_directory_may_start_mid_chain(tmp_path: Path) -> None:
    # A node restored from a snapshot writes only what it applies after the snapshot.
    chain, records = chained(8)
    write_chain(tmp_path, records[5:])
    assert list_segments(tmp_path)[0].name == segment_name(6)
    assert not verify_directory(tmp_path).ok
    assert verify_directory(tmp_path, start_seq=6, start_prev_hash=records[4].hash,
                            expected_head=chain.head).ok


def test_export(pristine: tuple[Path, AuditChain, list[ChainedRecord]]) -> None:
    directory, _, records = pristine
    out = io.StringIO()
    assert export_jsonl(directory, out) == N
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line, record in zip(lines, records, strict=True):
        audit = line["additionalEventData"].pop("kmsdAudit")
        assert audit == {"seq": record.seq, "hash": record.hash, "node": record.node,
                         "revoked": record.revoked}
        if not line["additionalEventData"]:
            del line["additionalEventData"]
        assert line == record.event
    decrypts = io.StringIO()
    count = export_jsonl(directory, decrypts, event_name="Decrypt", chain_fields=False)
    assert count == sum(r.event["eventName"] == "Decrypt" for r in records) > 0
    assert all(json.loads(x)["eventName"] == "Decrypt" and "additionalEventData" not in
               json.loads(x) for x in decrypts.getvalue().splitlines())
    # Events are 61 s apart (support.sample_events): a window of 3 minutes holds 3 of them.
    start = math.floor(EVENT_TIME) + 61 * 4
    window = io.StringIO()
    assert export_jsonl(directory, window, since=start, until=start + 180) == 3
    assert export_jsonl(directory, io.StringIO(),
                        since=datetime.fromtimestamp(start, UTC)) == N - 4


# -- crashes: torn tails --------------------------------------------------------------------------

def test_a_torn_final_line_is_torn_not_tampering(copy: Path, pristine: tuple[
        Path, AuditChain, list[ChainedRecord]]) -> None:
    _, chain, records = pristine
    extra_chain = AuditChain(chain.head)
    extra = extra_chain.append([AuditEntry.of(records[0].event, "node-a")])[0]
    last = list_segments(copy)[-1]
    lines_before = len(last.read_bytes().splitlines())
    for cut in (1, 40, len(extra.to_line()) - 1):  # -1: the record is whole, the newline isn't
        with last.open("ab") as f:
            f.write(extra.to_line()[:cut])
        result = verify_directory(copy, expected_head=chain.head)
        assert result.ok, result.error
        assert result.records == N
        assert result.torn is not None
        assert (result.torn.file, result.torn.line, result.torn.length) == (
            last.name, lines_before + 1, cut)
        reader = read_records(copy)
        assert list(reader) == records and reader.torn == result.torn
        with last.open("r+b") as f:  # undo for the next cut
            f.truncate(last.stat().st_size - cut)


def test_writer_recovery_cuts_the_torn_tail(copy: Path, pristine: tuple[
        Path, AuditChain, list[ChainedRecord]]) -> None:
    _, chain, records = pristine
    next_chain = AuditChain(chain.head)
    more = next_chain.append([AuditEntry.of(records[1].event, "node-a")])
    last = list_segments(copy)[-1]
    size = last.stat().st_size
    with last.open("ab") as f:
        f.write(more[0].to_line()[:25])
    with SegmentWriter(copy, max_bytes=MAX_BYTES) as writer:
        assert writer.recovered_torn is not None and writer.recovered_torn.length == 25
        assert last.stat().st_size == size
        assert writer.head == chain.head
        assert writer.append(more) == 1
    result = verify_directory(copy, expected_head=next_chain.head)
    assert result.ok and result.torn is None


def test_recovery_removes_an_empty_or_torn_only_newest_segment(copy: Path, pristine: tuple[
        Path, AuditChain, list[ChainedRecord]]) -> None:
    _, chain, _ = pristine
    (copy / segment_name(N + 1)).write_bytes(b"")
    (copy / segment_name(N + 2)).write_bytes(b'{"event":{"eve')
    with SegmentWriter(copy, max_bytes=MAX_BYTES) as writer:
        assert writer.head == chain.head
        assert writer.recovered_torn is not None
    assert [p.name for p in list_segments(copy)][-1] != segment_name(N + 1)
    assert verify_directory(copy, expected_head=chain.head).ok


def test_an_overwritten_final_newline_is_damage_not_a_torn_write(copy: Path) -> None:
    last = list_segments(copy)[-1]
    data = bytearray(last.read_bytes())
    data[-1] = ord("x")
    last.write_bytes(bytes(data))
    result = verify_directory(copy)
    assert result.error is not None and result.torn is None
    assert result.error.problem is Problem.MALFORMED
    assert (result.error.file, result.error.position) == (last.name, N - 1)
    with pytest.raises(CorruptSegmentError):
        list(read_records(copy))
    with pytest.raises(CorruptSegmentError):
        export_jsonl(copy, io.StringIO())


def test_an_unterminated_line_in_an_older_segment_is_damage(copy: Path) -> None:
    first = list_segments(copy)[0]
    first.write_bytes(first.read_bytes()[:-1])
    result = verify_directory(copy)
    assert result.error is not None and result.torn is None
    assert (result.error.problem, result.error.file) == (Problem.MALFORMED, first.name)


# -- tampering ------------------------------------------------------------------------------------

def test_a_removed_last_record_needs_the_expected_head(copy: Path, pristine: tuple[
        Path, AuditChain, list[ChainedRecord]]) -> None:
    _, chain, _ = pristine
    last = list_segments(copy)[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:-1]))
    assert verify_directory(copy).ok  # the chain alone cannot tell
    result = verify_directory(copy, expected_head=chain.head)
    assert result.error is not None
    assert (result.error.problem, result.error.position, result.error.expected_seq) == (
        Problem.HEAD_MISMATCH, N - 1, N)


def test_a_removed_segment_file_is_a_gap(copy: Path) -> None:
    files = list_segments(copy)
    gone = files[1]
    first_gone = json.loads(gone.read_bytes().splitlines()[0])["seq"]
    gone.unlink()
    result = verify_directory(copy)
    assert result.error is not None
    assert (result.error.problem, result.error.expected_seq, result.error.file,
            result.error.line) == (Problem.SEQ_GAP, first_gone, files[2].name, 1)


def test_a_case_changed_escape_is_not_canonical(copy: Path) -> None:
    # Same JSON value, different bytes: json.loads alone would not notice.
    for path in list_segments(copy):
        data = path.read_bytes()
        if b"\\u00e9" in data:
            path.write_bytes(data.replace(b"\\u00e9", b"\\u00E9", 1))
            break
    else:
        pytest.fail("no escaped character in the sample events")
    result = verify_directory(copy)
    assert result.error is not None and result.error.problem is Problem.NON_CANONICAL


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_is_named(pristine: tuple[Path, AuditChain, list[ChainedRecord]],
                                   data: st.DataObject) -> None:
    source, chain, _ = pristine
    files = list_segments(source)
    index = data.draw(st.integers(0, len(files) - 1), label="file")
    content = files[index].read_bytes()
    offset = data.draw(st.integers(0, len(content) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    line = content.count(b"\n", 0, offset) + 1
    position = layout(source).index((files[index].name, line))
    for target in clone(source):
        damaged = bytearray(content)
        damaged[offset] ^= mask
        (target / files[index].name).write_bytes(bytes(damaged))
        result = verify_directory(target, expected_head=chain.head)
        assert result.error is not None, "a flipped byte went unnoticed"
        assert result.error.problem is not Problem.HEAD_MISMATCH
        assert (result.error.file, result.error.line, result.error.position) == (
            files[index].name, line, position), result.error.message
        assert result.torn is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, N - 2))
def test_any_removed_record_is_named(pristine: tuple[Path, AuditChain, list[ChainedRecord]],
                                     index: int) -> None:
    source, _, _ = pristine
    where = layout(source)
    file, line = where[index]
    for target in clone(source):
        path = target / file
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:line - 1] + lines[line:]))
        result = verify_directory(target)
        assert result.error is not None
        error = result.error
        assert (error.problem, error.position, error.seq, error.expected_seq) == (
            Problem.SEQ_GAP, index, index + 2, index + 1), error.message
        assert (error.file, error.line) == layout(target)[index]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True).map(sorted))
def test_any_two_swapped_records_are_named(
        pristine: tuple[Path, AuditChain, list[ChainedRecord]], pair: list[int]) -> None:
    source, _, _ = pristine
    i, j = pair
    where = layout(source)
    for target in clone(source):
        contents = {p.name: p.read_bytes().splitlines(keepends=True)
                    for p in list_segments(target)}
        (fi, li), (fj, lj) = where[i], where[j]
        contents[fi][li - 1], contents[fj][lj - 1] = contents[fj][lj - 1], contents[fi][li - 1]
        for name, lines in contents.items():
            (target / name).write_bytes(b"".join(lines))
        result = verify_directory(target)
        assert result.error is not None
        error = result.error
        assert (error.problem, error.position, error.seq, error.expected_seq) == (
            Problem.SEQ_OUT_OF_ORDER, i, j + 1, i + 1), error.message
        assert (error.file, error.line) == (fi, li)


def test_recovery_reads_back_across_small_blocks(copy: Path, pristine: tuple[
        Path, AuditChain, list[ChainedRecord]], monkeypatch: pytest.MonkeyPatch) -> None:
    # Recovery reads the newest segment backwards in blocks; make them tiny to walk the loop.
    _, chain, records = pristine
    monkeypatch.setattr(segments, "_TAIL_BLOCK", 7)
    last = list_segments(copy)[-1]
    with last.open("ab") as f:
        f.write(records[0].to_line()[:300])
    with SegmentWriter(copy, max_bytes=MAX_BYTES) as writer:
        assert writer.head == chain.head
        assert writer.recovered_torn is not None and writer.recovered_torn.length == 300


def test_empty_missing_and_foreign_files(tmp_path: Path) -> None:
    assert verify_directory(tmp_path / "missing").ok
    assert list(read_records(tmp_path / "missing")) == []
    (tmp_path / "notes.txt").write_text("not a segment")
    (tmp_path / "seg-1.jsonl").write_text("wrong name pattern")
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 0
    _, records = chained(4)
    write_chain(tmp_path, records)
    assert list(read_records(tmp_path)) == records
