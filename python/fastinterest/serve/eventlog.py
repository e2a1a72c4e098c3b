"""The durable event log of a state store: an append-only file, one `write()` per append.

Why a file of our own and not a SQLite table: an append on the request path is one event, and a SQLite
commit of one row (B-tree pages of the table and its index copied into the WAL, two WAL frames, the
statement machinery) cost ~30 us with warm caches and 100-200 us when the request follows other work,
which was most of what an append costs. Here it is an encoded record (~100 bytes) and one `write()` on a
file opened with O_APPEND, under an advisory lock for the processes sharing the log. The durability is the
same as SQLite's WAL with synchronous=NORMAL: once `write()` returns the data is in the OS page cache, and a
killed process (kill -9) loses nothing; `sync=True` adds an `fdatasync` per append, which also survives
a power cut.

Layout (all little-endian):

    header   b"FIEVLOG1" + 16-byte log id (random; the state database records it, so that a log and a
             database of different stores are never mixed up)
    record   u32 payload length, u32 crc32(payload), payload = its events one after the other:
    event    i64 seq, i64 timestamp, i32 item, category, action, platform, u32 len(person), u32 len(raw),
             person (UTF-8), raw (the event as sent, JSON text, UTF-8)

One record per append (all of its events, written by a single `write()` call). Log positions (seq) are
1, 2, 3, ... without gaps, in file order. A reader stops at the first record that is not complete yet (a
writer of another process may be in the middle of it) or whose checksum fails (a writer died inside a
large `write()`, or the disk filled up): such a tail never held an acknowledged event, and the next
writer, under the lock, cuts it off (`repair`).

Processes that share a log serialise their appends with `flock` on the log file: a writer appends only if
the file ends where it last read it (else it first reads the other processes' records), so that every
process applies the log in the same order.
"""
from __future__ import annotations

import fcntl
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["EventLog", "LogCorrupt"]

MAGIC = b"FIEVLOG1"
HEADER = len(MAGIC) + 16
_REC = struct.Struct("<II")           # payload length, crc32
_EV = struct.Struct("<qqiiiiII")      # seq, timestamp, item, category, action, platform, len(person), len(raw)
_READ_CHUNK = 1 << 20


class LogCorrupt(RuntimeError):
    """The event log file is not one (bad header) or belongs to another store."""


def encode_events(rows: list[tuple], first: int) -> bytes:
    """One record of events (person, timestamp, item, category, action, platform, raw_json) at log positions
    first, first + 1, ..."""
    parts = []
    pack = _EV.pack
    for seq, (person, timestamp, item, category, action, platform, raw) in enumerate(rows, first):
        p, r = str(person).encode(), str(raw).encode()
        parts += (pack(seq, timestamp, item, category, action, platform, len(p), len(r)), p, r)
    payload = b"".join(parts)
    return _REC.pack(len(payload), zlib.crc32(payload)) + payload


def decode_events(payload: bytes | memoryview) -> list[tuple]:
    """The events of one record's payload as (seq, person, timestamp, item, category, action, platform, raw)."""
    out = []
    pos, end = 0, len(payload)
    unpack = _EV.unpack_from
    size = _EV.size
    try:
        while pos < end:
            seq, ts, item, category, action, platform, lp, lr = unpack(payload, pos)
            pos += size
            person = bytes(payload[pos:pos + lp]).decode()
            pos += lp
            raw = bytes(payload[pos:pos + lr]).decode()
            pos += lr
            out.append((seq, person, ts, item, category, action, platform, raw))
    except (struct.error, UnicodeDecodeError) as exc:
        raise LogCorrupt(f"a malformed event record ({exc})") from exc
    if pos != end or not out:
        raise LogCorrupt("a malformed event record (its events do not fill its payload)")
    return out


class EventLog:
    """An append-only event log file (see the module docstring).

    The object keeps a cursor: the file offset and the last log position up to which this process has read
    or written the log. `append(rows, after)` writes only when the log ends at position `after` at that
    cursor (nobody else appended), `read(seq)` returns the events after `seq` and moves the cursor.
    Thread-safe (one lock); every method may be called by any thread.
    """

    def __init__(self, path, *, sync: bool = False):
        self.path = Path(path)
        self.sync = bool(sync)
        self._lock = threading.RLock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with self.locked():
                size = os.fstat(self._fd).st_size
                if size == 0:
                    self._write(MAGIC + uuid.uuid4().bytes)
                    size = HEADER
                    if self.sync:   # the new file's directory entry, too
                        dfd = os.open(self.path.parent, os.O_RDONLY)
                        try:
                            os.fsync(dfd)
                        finally:
                            os.close(dfd)
                head = os.pread(self._fd, HEADER, 0)
                if len(head) < HEADER or head[:len(MAGIC)] != MAGIC:
                    raise LogCorrupt(f"{self.path} is not a fastinterest event log (bad header)")
                self.log_id = head[len(MAGIC):].hex()
                self._off, self._seq = HEADER, 0   # the cursor: the end of what this process has read
        except BaseException:
            os.close(self._fd)
            raise

    # ---- locking
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the log's write lock: this thread against the others of the process, and this process against
        the others sharing the file (flock)."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ---- reading
    def _scan(self, off: int) -> Iterator[tuple[int, bytes]]:
        """(end offset, payload) of each complete, intact record from `off` on, in file order. Stops at the end
        of the file and at an incomplete last record (being written by another process, or torn: its length
        runs past the end). A record whose checksum fails is a torn tail when it ends exactly at the end of
        the file (stops there too), and damage otherwise: `LogCorrupt`, never a silent stop, since the
        records after it are acknowledged ones."""
        size = os.fstat(self._fd).st_size
        buf, base = b"", off          # buf holds the file from `base` on
        while True:
            rel = off - base
            need = _REC.size if rel + _REC.size > len(buf) else _REC.size + _REC.unpack_from(buf, rel)[0]
            if rel + need > len(buf):
                if base + len(buf) >= size:
                    return            # incomplete: being written, or torn
                more = os.pread(self._fd, max(_READ_CHUNK, need - (len(buf) - rel)), base + len(buf))
                if not more:
                    return            # the file shrank under us (a torn tail was cut): its end is here
                buf = buf[rel:] + more
                base = off
                continue
            n, crc = _REC.unpack_from(buf, rel)
            payload = buf[rel + _REC.size: rel + _REC.size + n]
            end = off + _REC.size + n
            if zlib.crc32(payload) != crc:
                if end >= os.fstat(self._fd).st_size:
                    return            # a torn last record
                raise LogCorrupt(f"{self.path}: the record at byte {off} is damaged (checksum) and acknowledged "
                                 "records follow it; restore the file from a copy")
            off = end
            yield off, payload

    def read(self, seq: int, chunk: int = 1024) -> Iterator[list[tuple]]:
        """The events after log position `seq`, in log order, as lists of at most about `chunk` events (seq,
        person, timestamp, item, category, action, platform, raw). Continues from the cursor when `seq` is
        at or after it (the usual case: the caller applied everything up to there), else reads the log from
        its start. Moves the cursor over what it read. (The lock is taken for the cursor only, never across
        a yield: a consumer that stops early must not leave it held.)"""
        with self._lock:
            start, last = (self._off, self._seq) if seq >= self._seq else (HEADER, 0)
        out: list[tuple] = []
        for end, events in self._records(start, last):
            with self._lock:
                if end > self._off:   # records have the same boundaries for every reader: the cursor only advances
                    self._off, self._seq = end, events[-1][0]
            out += [e for e in events if e[0] > seq] if events[0][0] <= seq else events
            if len(out) >= chunk:
                yield out
                out = []
        if out:
            yield out

    def moved(self) -> bool:
        """True when the file holds more than this process has read (another process appended, or an
        incomplete tail): one fstat, no reading."""
        return os.fstat(self._fd).st_size != self._off

    @property
    def cursor(self) -> tuple[int, int]:
        """(log position, file offset) up to which this process has read or written the log."""
        with self._lock:
            return self._seq, self._off

    def start_at(self, seq: int, off: int) -> bool:
        """Move the cursor to a position recorded earlier (a checkpoint's: the record ending at file offset `off`
        ends with event `seq`), so that reading the events after `seq` starts there instead of at the start of
        the file. Checked as far as it cheaply can be (the next record, if any, starts with event seq + 1);
        returns whether it moved."""
        with self._lock:
            size = os.fstat(self._fd).st_size
            if seq < 0 or not HEADER <= off <= size or (off == HEADER) != (seq == 0):
                return False
            if off + _REC.size + 8 <= size:
                head = os.pread(self._fd, _REC.size + 8, off)
                if len(head) < _REC.size + 8 or struct.unpack_from("<q", head, _REC.size)[0] != seq + 1:
                    return False
            self._off, self._seq = off, seq
            return True

    def _records(self, off: int, last: int) -> Iterator[tuple[int, list[tuple]]]:
        """(end offset, events) of each record from `off` on, where the log position before it is `last`;
        checks that positions continue without gaps."""
        for end, payload in self._scan(off):
            events = decode_events(payload)
            if events[0][0] != last + 1:
                raise LogCorrupt(f"{self.path}: the record at byte {end - len(payload) - _REC.size} starts at log "
                                 f"position {events[0][0]}, not {last + 1}")
            last = events[-1][0]
            yield end, events

    def last_seq(self) -> int:
        """The position of the last event in the log (0: none). Reads what the cursor has not, without moving
        it (the cursor is where the caller's reading goes on)."""
        with self._lock:
            last = self._seq
            for _, events in self._records(self._off, self._seq):
                last = events[-1][0]
            return last

    def events(self) -> Iterator[tuple]:
        """Every event of the log, in order (does not move the cursor)."""
        for _, events in self._records(HEADER, 0):
            yield from events

    # ---- writing
    def _write(self, data: bytes, size: int | None = None) -> None:
        """One write() of a whole record at the end of the file (O_APPEND; `size`: the file's size, if known);
        a short write is undone."""
        if size is None:
            size = os.fstat(self._fd).st_size
        try:
            done = os.write(self._fd, data)
        except OSError:
            os.ftruncate(self._fd, size)
            raise
        if done != len(data):
            os.ftruncate(self._fd, size)
            raise OSError(f"{self.path}: short write ({done} of {len(data)} bytes; disk full?)")
        if self.sync:
            try:
                os.fdatasync(self._fd)
            except OSError:   # the append fails as a whole: no record left behind for readers to apply
                os.ftruncate(self._fd, size)
                raise

    def repair(self) -> None:
        """With the lock held: read to the end of the intact records (moving the cursor) and cut off a tail
        that is not one (a record torn by a process that died inside its write: never acknowledged)."""
        for _ in self.read(self._seq, chunk=1 << 30):
            pass
        if os.fstat(self._fd).st_size > self._off:
            os.ftruncate(self._fd, self._off)

    def settle(self) -> None:
        """Cut off a torn tail, if the log has one, without moving the cursor (at open: else every read would
        find the file longer than its intact records until the next append repaired it)."""
        with self._lock:
            end = self._off
            for end, _ in self._scan(self._off):
                pass
            if os.fstat(self._fd).st_size > end:
                with self.locked():
                    end = self._off
                    for end, _ in self._scan(self._off):
                        pass
                    if os.fstat(self._fd).st_size > end:
                        os.ftruncate(self._fd, end)

    def append(self, rows: list[tuple], after: int) -> int | None:
        """Append events (person, timestamp, item, category, action, platform, raw_json) at log positions
        after + 1, ... when the log ends at `after` (nobody appended since this process read it up to there):
        returns after + 1 once written; else None and nothing is written.

        The request path: the lock is taken inline, not through `locked()` (a generator context manager cost
        about as much as the write itself), and one fstat both checks the log's end and sizes the write."""
        if not rows:
            raise ValueError("no events to append")
        data = encode_events(rows, after + 1)
        with self._lock:
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if self._seq != after or os.fstat(fd).st_size != self._off:
                    return None
                self._write(data, self._off)
                self._off += len(data)
                self._seq = after + len(rows)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return after + 1

    def append_locked(self, rows: list[tuple]) -> int:
        """Inside `locked()`: read what others appended, then append at the end; returns the first position."""
        if not rows:
            raise ValueError("no events to append")
        self.repair()
        first = self._seq + 1
        data = encode_events(rows, first)
        self._write(data)
        self._off += len(data)
        self._seq += len(rows)
        return first

    def flush(self) -> None:
        """fdatasync: everything written so far is on disk (a checkpoint calls it before it records a
        watermark, so that a power cut never leaves a checkpoint ahead of the log)."""
        with self._lock:
            os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
