"""The serving event log file (`fastinterest.serve.eventlog`) and the state store built on it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import struct
import zlib

import numpy as np
import pytest
from fastinterest.serve.eventlog import HEADER, EventLog, LogCorrupt, decode_events, encode_events
from fastinterest.serve.state import StateMismatch, StateRecord, StateStore, log_path


def rows_for(n: int, tag: str = "p", start: int = 0) -> list[tuple]:
    """n events (person, timestamp, item, category, action, platform, raw) with distinct, non-zero fields."""
    return [(f"{tag}-{(start + i) % 3}-é", 1_700_000_000 + start + i, 1000 + start + i, 7 + i % 5, 2 + i % 3, 3,
             json.dumps({"i": start + i, "text": "ü ☃"})) for i in range(n)]


def filled_log(path, records: int, per: int) -> EventLog:
    """A log with `records` appends of `per` events each (rows_for, positions 1 .. records * per)."""
    log = EventLog(path)
    for i in range(records):
        assert log.append(rows_for(per, start=per * i), after=per * i) == per * i + 1
    return log


def as_logged(rows: list[tuple], first: int) -> list[tuple]:
    return [(seq, *row) for seq, row in enumerate(rows, first)]


def test_encode_decode_round_trip():
    rows = rows_for(5)
    data = encode_events(rows, 11)
    n, crc = struct.unpack_from("<II", data)
    assert n == len(data) - 8 and crc == zlib.crc32(data[8:])
    assert decode_events(data[8:]) == as_logged(rows, 11)


def test_append_read_and_cursor(tmp_path):
    log = EventLog(tmp_path / "a.log")
    assert log.cursor == (0, HEADER) and log.last_seq() == 0 and list(log.read(0)) == []
    a, b = rows_for(3), rows_for(1, start=3)
    assert log.append(a, after=0) == 1
    assert log.append(b, after=3) == 4
    assert log.append(b, after=3) is None          # the log ends at 4 now: nothing written
    assert log.append(b, after=7) is None
    assert log.last_seq() == 4 and log.cursor[0] == 4
    assert list(log.events()) == as_logged(a + b, 1)
    assert os.path.getsize(tmp_path / "a.log") == log.cursor[1]
    # reading after any position; from before the cursor it starts over at the file's start
    assert [e for chunk in log.read(2) for e in chunk] == as_logged(a + b, 1)[2:]
    assert [e for chunk in log.read(4) for e in chunk] == []
    log.close()
    again = EventLog(tmp_path / "a.log")            # a new process: the cursor at the start
    assert again.log_id == log.log_id and again.cursor == (0, HEADER)
    assert [e for chunk in again.read(0, chunk=2) for e in chunk] == as_logged(a + b, 1)
    assert again.cursor == (4, os.path.getsize(tmp_path / "a.log"))
    again.close()


def test_chunks_of_read(tmp_path):
    log = filled_log(tmp_path / "c.log", 10, 3)
    fresh = EventLog(tmp_path / "c.log")
    chunks = list(fresh.read(0, chunk=7))
    assert [len(c) for c in chunks] == [9, 9, 9, 3]   # whole records, at least `chunk` events per list
    assert [e[0] for c in chunks for e in c] == list(range(1, 31))
    log.close(), fresh.close()


def test_large_records_are_read_across_buffer_refills(tmp_path):
    log = EventLog(tmp_path / "big.log")
    big = [(f"p{i}", i, i, i, i, i, "x" * 50_000) for i in range(60)]   # ~3 MB: several 1 MiB reads
    assert log.append(big[:30], after=0) == 1
    assert log.append(big[30:], after=30) == 31
    other = EventLog(tmp_path / "big.log")
    assert [e for c in other.read(0) for e in c] == as_logged(big, 1)
    log.close(), other.close()


@pytest.mark.parametrize("damage", ["cut", "crc", "garbage"])
def test_a_torn_tail_is_cut_and_the_log_goes_on(tmp_path, damage):
    """A record the writer did not finish (killed inside a large write, or the disk filled up) is never an
    acknowledged one: readers stop before it, and the next writer, or the next open, cuts it off."""
    path = tmp_path / "t.log"
    log = EventLog(path)
    log.append(rows_for(2), after=0)
    good = os.path.getsize(path)
    record = encode_events(rows_for(2, start=2), 3)
    with open(path, "ab") as f:
        if damage == "cut":
            f.write(record[: len(record) // 2])
        elif damage == "crc":
            f.write(record[:4] + struct.pack("<I", (struct.unpack_from("<I", record, 4)[0] + 1) % 2**32) + record[8:])
        else:
            f.write(b"\x07" * 5)
    reader = EventLog(path)
    assert [e[0] for c in reader.read(0) for e in c] == [1, 2]      # stops before the torn record
    assert reader.moved()                                             # the file is longer than its records
    assert log.append(rows_for(1, start=2), after=2) is None          # the fast path declines...
    with log.locked():
        assert log.append_locked(rows_for(1, start=2)) == 3            # ...the locked path cuts and appends
    assert [e[0] for e in reader.events()] == [1, 2, 3]
    assert os.path.getsize(path) == good + len(encode_events(rows_for(1, start=2), 3))
    log.close(), reader.close()
    # at open: `settle` cuts a torn tail without reading the log into the cursor
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")
    settled = EventLog(path)
    settled.settle()
    assert settled.cursor == (0, HEADER) and [e[0] for e in settled.events()] == [1, 2, 3]
    assert os.path.getsize(path) == good + len(encode_events(rows_for(1, start=2), 3))
    settled.close()


def test_not_a_log(tmp_path):
    path = tmp_path / "x.log"
    path.write_bytes(b"SQLite format 3\x00" + bytes(100))
    with pytest.raises(LogCorrupt, match="not a fastinterest event log"):
        EventLog(path)


def test_start_at_checks_the_position(tmp_path):
    path = tmp_path / "s.log"
    log = EventLog(path)
    log.append(rows_for(2), after=0)
    seq, off = log.cursor
    log.append(rows_for(3, start=2), after=2)
    fresh = EventLog(path)
    assert not fresh.start_at(1, off)                # the record after `off` starts with 3, not 2
    assert not fresh.start_at(2, off + 1)
    assert not fresh.start_at(2, HEADER)
    assert fresh.cursor == (0, HEADER)
    assert fresh.start_at(seq, off)
    assert [e[0] for c in fresh.read(2) for e in c] == [3, 4, 5]
    log.close(), fresh.close()


def _writer(path: str, tag: str, n: int, queue) -> None:
    """Append n single events, each after catching up with the other process (the session's protocol)."""
    log = EventLog(path)
    mine = []
    for i in range(n):
        while True:
            for _ in log.read(log.cursor[0]):
                pass
            first = log.append([(tag, i, i + 1, 2, 3, 4, "{}")], after=log.cursor[0])
            if first is not None:
                mine.append(first)
                break
    log.close()
    queue.put(mine)


def test_two_processes_append_concurrently_without_gaps_or_losses(tmp_path):
    path = str(tmp_path / "mp.log")
    EventLog(path).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, tag, 150, q)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    acked = sorted(q.get(timeout=120) + q.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    events = list(EventLog(path).events())
    assert [e[0] for e in events] == list(range(1, 301)) == acked
    for tag in ("a", "b"):   # each process's events in its order
        assert [e[2] for e in events if e[1] == tag] == list(range(150))


# ---------------------------------------------------------------------------------------------- the store
SHAPE = (1, 4, 3)


def store(path, run="r1") -> StateStore:
    return StateStore(path, shape=SHAPE, fingerprint={"run": run})


def record(person, n, seq) -> StateRecord:
    rng = np.random.default_rng(seq)
    return StateRecord(person, n, seq, rng.standard_normal((1, 4)).astype(np.float32),
                       rng.standard_normal((1, 4)).astype(np.float32), rng.integers(2, 9, (4, 3)).astype(np.int32))


def test_store_checkpoint_and_restart_start_after_the_watermark(tmp_path):
    path = tmp_path / "state.sqlite3"
    s = store(path)
    assert s.append_events(rows_for(3), after=0) == 1
    s.checkpoint([record("p-0-é", 3, 3)], watermark=3)
    assert s.append_events(rows_for(2, start=3), after=3) == 4
    assert s.last_seq() == 5 and s.count_events() == 5 and s.watermark() == 3
    assert [e["i"] for e in s.events_of("p-0-é")] == [0, 3]
    s.close()
    again = store(path)
    assert again.log.cursor[0] == 3                  # positioned at the checkpoint, not at the start
    assert [e[0] for c in again.events_since(3) for e in c] == [4, 5]
    (rec,) = again.states_since(0)
    assert rec.person == "p-0-é" and rec.last_seq == 3
    again.close()


def test_store_refuses_a_log_of_another_store(tmp_path):
    a, b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    sa, sb = store(a), store(b)
    sa.append_events(rows_for(2), after=0)
    sb.append_events(rows_for(1), after=0)
    sa.checkpoint([record("p", 2, 2)], watermark=2)
    sa.close(), sb.close()
    os.replace(log_path(b), log_path(a))
    with pytest.raises(StateMismatch, match="not the event log"):
        store(a)
    os.unlink(log_path(a))                            # states without their log
    with pytest.raises(StateMismatch, match="missing or empty"):
        store(a)


def old_store_with_events(path, rows: list[tuple]) -> None:
    """A state file as an earlier version wrote it: the log in an `events` table (positions 1, 2, ...)."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE events (seq INTEGER PRIMARY KEY, person TEXT NOT NULL, timestamp INTEGER NOT NULL,
            item INTEGER NOT NULL, category INTEGER NOT NULL, action INTEGER NOT NULL, platform INTEGER NOT NULL,
            raw TEXT NOT NULL);""")
    db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", as_logged(rows, 1))
    db.commit(), db.close()


def test_store_moves_an_events_table_of_an_earlier_version_into_the_log(tmp_path):
    path = tmp_path / "old.sqlite3"
    rows = rows_for(4)
    old_store_with_events(path, rows)
    s = store(path)
    assert list(s.log.events()) == as_logged(rows, 1)
    assert s._reader.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchone() is None
    assert [e[0] for c in s.events_since(0) for e in c] == [1, 2, 3, 4]
    assert s.append_events(rows_for(1, start=4), after=4) == 5
    s.close()


def test_a_reader_that_stops_early_does_not_block_writers(tmp_path):
    import threading

    log = filled_log(tmp_path / "e.log", 4, 2)
    reader = EventLog(tmp_path / "e.log")
    it = reader.read(0, chunk=2)
    assert [e[0] for e in next(it)] == [1, 2]     # the generator is suspended here, not finished
    done = threading.Event()

    def write():
        for _ in reader.read(reader.cursor[0]):
            pass
        assert reader.append(rows_for(1, start=8), after=8) == 9
        done.set()

    t = threading.Thread(target=write)
    t.start()
    t.join(timeout=10)
    assert done.is_set()
    del it
    assert [e[0] for e in log.events()] == list(range(1, 10))
    log.close(), reader.close()


def test_damage_inside_the_log_raises_instead_of_cutting_acknowledged_records(tmp_path):
    """A bad checksum with records after it is damage, not a torn tail: reading raises, and opening never
    truncates the acknowledged records behind it."""
    path = tmp_path / "d.log"
    log = filled_log(path, 5, 1)
    log.close()
    size = os.path.getsize(path)
    data = bytearray(path.read_bytes())
    second = HEADER + len(encode_events(rows_for(1), 1))
    data[second + 8 + 3] ^= 0xFF                      # a byte of record 2's payload
    path.write_bytes(bytes(data))
    damaged = EventLog(path)
    with pytest.raises(LogCorrupt, match="damaged"):
        damaged.settle()
    with pytest.raises(LogCorrupt, match="damaged"):
        list(damaged.read(0))
    assert os.path.getsize(path) == size              # nothing cut
    damaged.close()


def test_malformed_records_and_empty_appends(tmp_path):
    log = EventLog(tmp_path / "m.log")
    with pytest.raises(ValueError, match="no events"):
        log.append([], after=0)
    with log.locked(), pytest.raises(ValueError, match="no events"):
        log.append_locked([])
    assert os.path.getsize(tmp_path / "m.log") == HEADER
    with pytest.raises(LogCorrupt, match="malformed"):
        decode_events(b"\x01\x02\x03")
    payload = encode_events(rows_for(1), 1)[8:]
    with pytest.raises(LogCorrupt, match="malformed"):
        decode_events(payload + b"\x00")
    log.close()


def test_a_scan_ends_when_the_file_shrinks_under_it(tmp_path):
    """A reader scanning while another process cuts a torn tail must stop at the new end, not spin."""
    path = tmp_path / "shrink.log"
    log = EventLog(path)
    big = [("p", 1, 1, 1, 1, 1, "x" * 700_000)]
    for i in range(4):
        log.append(big, after=i)
    first_end = HEADER + len(encode_events(big, 1))
    scan = log._scan(HEADER)
    end, _ = next(scan)
    assert end == first_end
    os.truncate(path, first_end + 100)                # the rest vanishes (and a partial record remains)
    assert list(scan) == []
    log.close()


def test_store_refuses_a_log_behind_its_checkpoint(tmp_path):
    """A log that lost its end (power cut with synchronous='normal', or an older copy) while the checkpoint
    survived would give new events positions the states already hold: opening refuses it."""
    path = tmp_path / "state.sqlite3"
    s = store(path)
    s.append_events(rows_for(2), after=0)
    old = log_path(path).read_bytes()
    s.append_events(rows_for(3, start=2), after=2)
    s.checkpoint([record("p", 5, 5)], watermark=5)
    s.close()
    log_path(path).write_bytes(old)
    with pytest.raises(StateMismatch, match="ends at log position 2"):
        store(path)


def test_an_interrupted_migration_is_resumed(tmp_path):
    """A migration killed after part of the table reached the log finishes on the next open."""
    path = tmp_path / "old.sqlite3"
    rows = rows_for(10)
    old_store_with_events(path, rows)
    partial = EventLog(log_path(path))               # what a killed migration left: the first 4 events
    partial.append(rows[:4], after=0)
    partial.close()
    s = store(path)
    assert list(s.log.events()) == as_logged(rows, 1)
    s.close()


def test_synchronous_full_syncs_every_append(tmp_path, monkeypatch):
    """synchronous='full': the log is opened with sync=True and every append is followed by an fdatasync of
    it (counted here), before the append returns."""
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    path = tmp_path / "full.sqlite3"
    s = StateStore(path, shape=SHAPE, fingerprint={"run": "r"}, synchronous="full")
    assert s.log.sync
    n0 = len(calls)
    assert s.append_events(rows_for(2), after=0) == 1
    assert s.append_events(rows_for(1, start=2), after=2) == 3
    assert len(calls) == n0 + 2
    s.close()
    again = StateStore(path, shape=SHAPE, fingerprint={"run": "r"})
    assert [e[0] for c in again.events_since(0) for e in c] == [1, 2, 3]
    again.close()
    with pytest.raises(ValueError, match="synchronous"):
        StateStore(tmp_path / "x.sqlite3", shape=SHAPE, fingerprint={"run": "r"}, synchronous="sometimes")
