"""Per-person sequence state: in memory (numpy) and durable (an event log file + a SQLite checkpoint).

A person's state is everything needed to answer for them and to absorb their next event in O(1):

    h, c          [num_layers, H] float32   the LSTM state after the person's last event
    window        [4, W] ids (item, category, action, platform) of the last W events (W = the run's max_len),
                  left-aligned and in time order; the model's history features (category shares, repeat
                  counts) read it, and a service without sequence state would recompute from it
    n_events      events seen so far (the prepared history + everything appended)
    last_seq      the durable log position of the last event applied (0: none appended)

`PersonStates` holds every person's state in growable numpy arrays (row per person) together with the
user vector the model derives from it (and its unit vector, normalised when read). `StateStore` is the
durable copy, two files:

    PATH.log   the event log (`fastinterest.serve.eventlog.EventLog`): append-only, one record per append
               holding its events (log position seq, person, timestamp, item, category, action, platform,
               the raw event as sent)
    PATH       SQLite (WAL): states(person, n_events, last_seq, h, c, window), a checkpoint of the states, and
               meta(key, value): what run the states belong to, the log's id, and the checkpoint's watermark
               (with its offset in the log file)

The log is the truth and the states in memory are its cache. One append writes its events as one record
at the end of the log, if the log still ends where the appending process last read it
(`append_events`: one write(), no transaction), else it takes the log's lock, reads the events other
processes appended, recomputes and writes after them; the service acknowledges an append only after that
write. The states are written behind, as a checkpoint (`checkpoint`: the states changed since the last
one, in one SQLite transaction, every few thousand events and when the session closes), and
`watermark()` is the log position up to which the states table reflects every event. A restart loads the
checkpoint and replays the events after the watermark (`events_since`, starting at the watermark's offset
in the log file); so does a process catching up with the events other processes appended (it notices
them by the log file's size: one fstat per read). A state row is never replaced by an older one (its
last_seq decides).

Durability: once an append returns, its record is in the OS page cache: it survives the process being
killed (kill -9) but not a power cut or an OS crash; synchronous="full" also survives those, at the price
of an fdatasync per append (and SQLite's synchronous=FULL for the checkpoints). Several processes may share
one store (`fastinterest serve --workers N`): appends serialise on the log's lock (flock), and each process
replays the events the others appended.

Why the log is not a SQLite table (it was): committing one row cost ~30 us with warm caches and 100-200 us
when the request followed other work, most of an append's time; the file costs one write() (see
`fastinterest.serve.eventlog`). A store whose log is still an `events` table is converted when opened.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .eventlog import EventLog

__all__ = ["PersonStates", "StateMismatch", "StateRecord", "StateStore", "run_fingerprint"]


class StateMismatch(RuntimeError):
    """The state store was written for another run (other weights, vocabulary or window)."""


@dataclass
class StateRecord:
    """One person's state as stored (arrays in their in-memory shapes)."""

    person: str
    n_events: int
    last_seq: int
    h: np.ndarray            # float32 [L, H]
    c: np.ndarray            # float32 [L, H]
    window: np.ndarray       # int32 [4, W]: item, category, action, platform ids of the last W events


class PersonStates:
    """Every person's state in memory, one row per person (see the module docstring).

    Persons are string keys; `alias` adds another key for a row (a prepared person's numeric id beside
    its pseudonym). Not thread-safe by itself: the Session guards it with a lock.
    """

    def __init__(self, num_layers: int, hidden_size: int, window: int, user_dim: int, capacity: int = 1024):
        self.num_layers, self.hidden_size, self.width, self.user_dim = num_layers, hidden_size, window, user_dim
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.size = 0
        self._alloc(max(16, capacity))

    def _alloc(self, cap: int) -> None:
        L, H, W, U = self.num_layers, self.hidden_size, self.width, self.user_dim
        new = {"h": np.zeros((cap, L, H), np.float32), "c": np.zeros((cap, L, H), np.float32),
               "window": np.zeros((cap, 4, W), np.int32),
               "n_events": np.zeros(cap, np.int64), "last_seq": np.zeros(cap, np.int64),
               "user": np.zeros((cap, U), np.float32), "_unit": np.zeros((cap, U), np.float32),
               "_unit_stale": np.zeros(cap, bool)}
        for name, arr in new.items():
            old = getattr(self, name, None)
            if old is not None:
                arr[: self.size] = old[: self.size]
            setattr(self, name, arr)
        self.capacity = cap

    def __len__(self) -> int:
        return self.size

    def row(self, key) -> int | None:
        return self.index.get(str(key))

    def add(self, key: str) -> int:
        """The row of `key`, created (all zeros) when new."""
        key = str(key)
        r = self.index.get(key)
        if r is not None:
            return r
        if self.size == self.capacity:
            self._alloc(self.capacity * 2)
        r = self.size
        self.size += 1
        self.keys.append(key)
        self.index[key] = r
        return r

    def alias(self, key: str, row: int) -> None:
        self.index.setdefault(str(key), row)

    @property
    def win_item(self) -> np.ndarray:
        return self.window[:, 0]

    @property
    def win_category(self) -> np.ndarray:
        return self.window[:, 1]

    def set_rows(self, rows: np.ndarray, h: np.ndarray, c: np.ndarray, window: np.ndarray, n_events: np.ndarray,
                 last_seq: np.ndarray, user: np.ndarray) -> None:
        """Write states ([R, L, H] h and c, [R, 4, W] windows, [R] counters) and their user vectors [R, U]."""
        rows = np.asarray(rows, np.int64)
        self.h[rows], self.c[rows], self.window[rows] = h, c, window
        self.n_events[rows], self.last_seq[rows] = n_events, last_seq
        self.user[rows] = user
        self._unit_stale[rows] = True   # unit vectors are derived when read (`unit`), not on every append

    @property
    def unit(self) -> np.ndarray:
        """[capacity, U] user vectors scaled to length 1 (zeros stay zeros); rows written since the last read
        are normalised now, all at once."""
        stale = np.flatnonzero(self._unit_stale[: self.size])
        if len(stale):
            user = self.user[stale]
            norms = np.sqrt(np.einsum("ij,ij->i", user, user))[:, None]
            self._unit[stale] = user / np.maximum(norms, 1e-12)
            self._unit_stale[stale] = False
        return self._unit

    def known_rows(self) -> np.ndarray:
        """Rows of persons with at least one event (the ones `similar` and `target` can return)."""
        return np.flatnonzero(self.n_events[: self.size] > 0)

    def record(self, row: int) -> StateRecord:
        return StateRecord(self.keys[row], int(self.n_events[row]), int(self.last_seq[row]), self.h[row].copy(),
                           self.c[row].copy(), self.window[row].copy())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(run_dir, window: int, prepared_dir=None, recompute: bool = False) -> dict:
    """What stored states depend on: the weights, the vocabulary, the window, the prepared history, and
    whether the LSTM state is kept at all (a stateless session stores windows only)."""
    run_dir = Path(run_dir)
    fp = {"model": _sha256(run_dir / "model.safetensors"),
          "vocab": _sha256(run_dir / "vocab.json") if (run_dir / "vocab.json").exists() else None,
          "window": int(window), "prepared": None, "lstm_state": not recompute}
    if prepared_dir is not None:
        events = Path(prepared_dir) / "events.parquet"
        fp["prepared"] = {"events_bytes": events.stat().st_size if events.exists() else None}
    return fp


# events.seq, the log position, is set by the writer (`next_seq`: the last one + 1; events are never deleted).
# It is not AUTOINCREMENT, which would write its counter page (sqlite_sequence) with every append: a third
# page per one-event commit besides the table's and the index's. Stores made with AUTOINCREMENT work the same.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS states (
    person TEXT PRIMARY KEY, n_events INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    h BLOB NOT NULL, c BLOB NOT NULL, window BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS states_last_seq ON states (last_seq);
"""

SYNCHRONOUS = ("normal", "full")


def log_path(path) -> Path:
    """The event log file of the state database at `path` (beside it: PATH.log)."""
    path = Path(path)
    return path.with_name(path.name + ".log")


class StateStore:
    """The durable log (`EventLog`, the file PATH.log) + the state checkpoint (SQLite file PATH); see the module
    docstring.

    `shape` = (num_layers, H, W) of the states; `fingerprint` (a JSON-able dict) identifies the run the
    states belong to: opening a store written for another run raises `StateMismatch`.
    """

    def __init__(self, path, *, shape: tuple[int, int, int], fingerprint: dict, synchronous: str = "normal"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(x) for x in shape)
        self._write_lock = threading.Lock()   # one SQLite write transaction at a time in this process
        self._read_lock = threading.Lock()
        self._writer = self._connect(synchronous)
        self._reader = self._connect(synchronous)
        self.log = EventLog(log_path(self.path), sync=synchronous == "full")
        try:
            self._check_meta({"shape": list(self.shape), "run": fingerprint})
            self._check_log()
            with self._read_lock:
                meta = dict(self._reader.execute(
                    "SELECT key, value FROM meta WHERE key IN ('watermark', 'watermark_offset')").fetchall())
                top = self._reader.execute("SELECT COALESCE(MAX(last_seq), 0) FROM states").fetchone()[0]
            # reading after the checkpoint starts where it ends in the log file, not at the file's start
            watermark = int(meta.get("watermark", 0))
            self.log.start_at(watermark, int(meta.get("watermark_offset", 0)))
            self.log.settle()
            need, last = max(watermark, int(top)), self.log.last_seq()
            if last < need:   # new appends would get positions the states already hold: never applied
                raise StateMismatch(
                    f"{self.log.path} ends at log position {last}, but the checkpoint in {self.path} holds states up "
                    f"to position {need}: the log lost its end (a power cut with synchronous='normal'?) or is an "
                    "older copy. Restore the log, or delete both files to start over.")
        except BaseException:
            self.close()
            raise

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; the locks above serialise each connection.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60.0)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite could not switch to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.executescript(_SCHEMA)
        return conn

    def _check_meta(self, meta: dict) -> None:
        with self._db_transaction() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            for key, value in meta.items():
                text = json.dumps(value, sort_keys=True)
                if key not in stored:
                    db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, text))
                elif stored[key] != text:
                    raise StateMismatch(
                        f"{self.path} holds states of another run ({key}: stored {stored[key]}, this run {text}). "
                        "Serve this run with another state file, or delete that one to start over.")

    def _check_log(self) -> None:
        """The log file must be the one the states were checkpointed from (its id is in the meta table); a store
        of an earlier version kept the log in an `events` table: its events move to the log file once."""
        with self._db_transaction() as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone():
                self._migrate_events_table(db)
            stored = db.execute("SELECT value FROM meta WHERE key = 'log'").fetchone()
            if stored is None:
                has_states = db.execute("SELECT 1 FROM states LIMIT 1").fetchone() is not None
                if has_states and self.log.last_seq() == 0:
                    raise StateMismatch(f"{self.path} holds states but its event log {self.log.path} is missing or "
                                        "empty; restore the log, or delete the state file to start over.")
                db.execute("INSERT INTO meta (key, value) VALUES ('log', ?)", (self.log.log_id,))
            elif stored[0] != self.log.log_id and self.log.last_seq() == 0:
                raise StateMismatch(f"{self.path} was checkpointed from an event log that is missing or empty now "
                                    f"({self.log.path}, a new log was started); restore the log, or delete both files "
                                    "to start over.")
            elif stored[0] != self.log.log_id:
                raise StateMismatch(f"{self.log.path} is not the event log of {self.path} (log id {self.log.log_id}, "
                                    f"the states were written from {stored[0]}): a log and a state file of "
                                    "different stores; restore the pair, or delete both to start over.")

    def _migrate_events_table(self, db: sqlite3.Connection) -> None:
        """Move the `events` table of an earlier store version into the log file, then drop it (in the caller's
        transaction). Resumable: a migration killed part way left the first events in the log and the table
        in place, and the next open appends the rest."""
        with self.log.locked():
            n, lo, hi = db.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events").fetchone()
            if n and (lo, hi) != (1, n):
                raise StateMismatch(f"{self.path}: its events table has positions {lo}..{hi} for {n} events (gaps); "
                                    "it cannot be moved into the event log")
            done = self.log.last_seq()
            if done > n:
                raise StateMismatch(f"{self.path}: the event log {self.log.path} holds {done} events, more than the "
                                    f"events table ({n}) it is being filled from")
            cur = db.execute("SELECT person, timestamp, item, category, action, platform, raw FROM events "
                             "WHERE seq > ? ORDER BY seq", (done,))
            while rows := cur.fetchmany(4096):
                self.log.append_locked([tuple(r) for r in rows])
            self.log.flush()
            db.execute("DROP TABLE events")

    # ---- writing
    @contextmanager
    def _db_transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (SQLite's write lock, also against other processes) ... COMMIT, or ROLLBACK on error."""
        with self._write_lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[EventLog]:
        """Hold the log's write lock (against this process's other threads and other processes): inside, read
        the events others appended (`events_since(seq)`) and append after them (`insert_events`)."""
        with self.log.locked():
            yield self.log

    def insert_events(self, db: EventLog, rows: list[tuple]) -> int:
        """Inside `transaction()`: append events (person, timestamp, item, category, action, platform, raw_json)
        at the end of the log; returns the first one's log position."""
        return db.append_locked(rows)

    def append_events(self, rows: list[tuple], after: int) -> int | None:
        """Append events (as `insert_events`) at log positions after + 1, after + 2, ... if the log ends at
        position `after`, i.e. no other process appended since the caller applied the log up to there; returns
        after + 1 once they are written, hence durable; else None (nothing written: the log has moved on), and
        the caller takes a `transaction()`, catches up and inserts. The request path: one write()."""
        if not rows:
            return None
        return self.log.append(rows, after)

    @staticmethod
    def put_states(db: sqlite3.Connection, records: Iterable[StateRecord]) -> None:
        """Write states inside a transaction; a stored state with a later last_seq is kept."""
        db.executemany(
            "INSERT INTO states (person, n_events, last_seq, h, c, window) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (person) DO UPDATE SET n_events = excluded.n_events, last_seq = excluded.last_seq, "
            "h = excluded.h, c = excluded.c, window = excluded.window WHERE excluded.last_seq > states.last_seq",
            [(r.person, int(r.n_events), int(r.last_seq), np.ascontiguousarray(r.h, "<f4").tobytes(),
              np.ascontiguousarray(r.c, "<f4").tobytes(), np.ascontiguousarray(r.window, "<i4").tobytes())
             for r in records])

    def checkpoint(self, records: list[StateRecord], watermark: int) -> None:
        """Write states (the ones changed since the last checkpoint of this process) and raise the watermark to
        `watermark`: the caller's states reflect every event up to it. The watermark's offset in the log file
        goes with it when this process's log cursor stands there (else 0: a restart reads the log from the
        start)."""
        seq, off = self.log.cursor
        off = off if seq == watermark else 0
        self.log.flush()   # the log on disk first: a power cut must not leave the checkpoint ahead of it
        with self._db_transaction() as db:
            self.put_states(db, records)
            row = db.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
            if row is None or int(watermark) > int(row[0]):
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                               "value = excluded.value",
                               [("watermark", str(int(watermark))), ("watermark_offset", str(int(off)))])

    # ---- reading
    def _decode(self, row) -> StateRecord:
        L, H, W = self.shape
        person, n, seq, h, c, window = row
        return StateRecord(person, int(n), int(seq), np.frombuffer(h, "<f4").reshape(L, H).copy(),
                           np.frombuffer(c, "<f4").reshape(L, H).copy(),
                           np.frombuffer(window, "<i4").reshape(4, W).astype(np.int32))

    def states_since(self, seq: int, db: sqlite3.Connection | None = None) -> list[StateRecord]:
        """States whose last event is after `seq` (all of them for seq=0), oldest first."""
        query = ("SELECT person, n_events, last_seq, h, c, window FROM states WHERE last_seq > ? "
                 "ORDER BY last_seq")
        if db is not None:  # inside a transaction of the caller
            return [self._decode(r) for r in db.execute(query, (int(seq),))]
        with self._read_lock:
            return [self._decode(r) for r in self._reader.execute(query, (int(seq),))]

    def load_checkpoint(self) -> tuple[list[StateRecord], int]:
        """(every stored state, the watermark) from one snapshot of the database (read apart, a checkpoint of
        another process between the two reads would pair states with a later watermark than they reflect)."""
        with self._read_lock:
            db = self._reader
            db.execute("BEGIN")
            try:
                records = self.states_since(0, db)
                row = db.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
            finally:
                db.execute("COMMIT")
        return records, int(row[0]) if row else 0

    def watermark(self) -> int:
        """The log position up to which the states table reflects every event (0: none)."""
        with self._read_lock:
            row = self._reader.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
        return int(row[0]) if row else 0

    def events_since(self, seq: int, chunk: int = 1024) -> Iterator[list[tuple]]:
        """The events after log position `seq`, in log order, as lists of about `chunk` tuples (seq, person,
        item, category, action, platform, timestamp); inside a `transaction()` too (the lock is reentrant)."""
        for rows in self.log.read(seq, chunk):
            yield [(q, person, item, category, action, platform, ts)
                   for q, person, ts, item, category, action, platform, _ in rows]

    def has_new(self, seq: int) -> bool:
        """Whether the log may hold events after `seq` that a reader has not applied: one fstat (another process
        appended) and the cursor (read but not applied), no reading."""
        return seq < self.log.cursor[0] or self.log.moved()

    def events_of(self, person: str) -> list[dict]:
        """The appended events of a person, oldest first (the raw dicts as they were sent). Reads the whole log
        (an inspection tool, not a request path)."""
        person = str(person)
        return [json.loads(e[7]) for e in self.log.events() if e[1] == person]

    def last_seq(self) -> int:
        """The log position of the last event (0: none)."""
        return self.log.last_seq()

    def count_events(self) -> int:
        return sum(1 for _ in self.log.events())

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for conn in (self._reader, self._writer):
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
