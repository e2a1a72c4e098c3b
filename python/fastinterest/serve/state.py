"""Per-person sequence state: in memory (numpy) and durable (SQLite in WAL mode).

A person's state is everything needed to answer for them and to absorb their next event in O(1):

    h, c          [num_layers, H] float32   the LSTM state after the person's last event
    window        [4, W] ids (item, category, action, platform) of the last W events (W = the run's max_len),
                  left-aligned and in time order; the model's history features (category shares, repeat
                  counts) read it, and a service without sequence state would recompute from it
    n_events      events seen so far (the prepared history + everything appended)
    last_seq      the durable log position of the last event applied (0: none appended)

`PersonStates` holds every person's state in growable numpy arrays (row per person) together with the
user vector the model derives from it (and its unit vector, normalised when read). `StateStore` is the
durable copy:

    events(seq, person, timestamp, item, category, action, platform, raw)  append-only log, one row per event
    states(person, n_events, last_seq, h, c, window)                       a checkpoint of the states
    meta(key, value)                                                        what run the states belong to, and
                                                                            the checkpoint's watermark

The log is the truth and the states in memory are its cache. One append is one transaction that writes
the new events: usually a single INSERT at the end of the log as the appending process knows it
(`append_events`; SQLite commits a statement outside BEGIN as its own transaction), else, when other
processes appended since, BEGIN IMMEDIATE + their events replayed + INSERT + COMMIT; the service
acknowledges an append only after that commit.
The states are written behind, as a checkpoint (`checkpoint`: the states changed since the last one, in
one transaction, every few thousand events and when the session closes), and `watermark()` is the log
position up to which the states table reflects every event. A restart loads the checkpoint and replays
the events after the watermark (`events_since`); so does a process catching up with the events other
processes appended. A state row is never replaced by an older one (its last_seq decides).

Durability: with WAL and synchronous=NORMAL (the default) a committed transaction survives the process
being killed (kill -9) — SQLite has written it to the WAL file, and the OS keeps it when the process
dies — but not a power cut or an OS crash, which may lose the last transactions before the next WAL
checkpoint; synchronous=FULL also survives those, at the price of an fsync per commit. Several processes
may share one store (`fastinterest serve --workers N`): writers serialise on SQLite's write lock, and
each process replays the events other processes committed (`last_seq()` + `events_since(seq)`).
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
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, person TEXT NOT NULL, timestamp INTEGER NOT NULL,
    item INTEGER NOT NULL, category INTEGER NOT NULL, action INTEGER NOT NULL, platform INTEGER NOT NULL,
    raw TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_person ON events (person, seq);
CREATE TABLE IF NOT EXISTS states (
    person TEXT PRIMARY KEY, n_events INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    h BLOB NOT NULL, c BLOB NOT NULL, window BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS states_last_seq ON states (last_seq);
"""

SYNCHRONOUS = ("normal", "full")

_INSERT_CHUNK = 64   # rows per INSERT statement (64 * 8 parameters, far below SQLite's limit of 32766)
_INSERT_SQL: dict[int, str] = {}


def _insert_sql(n: int) -> str:
    """INSERT of n events with their log positions (one VALUES tuple per event)."""
    sql = _INSERT_SQL.get(n)
    if sql is None:
        sql = _INSERT_SQL[n] = ("INSERT INTO events (seq, person, timestamp, item, category, action, platform, raw) "
                                "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n))
    return sql


class StateStore:
    """The durable log + state table in one SQLite file (see the module docstring).

    `shape` = (num_layers, H, W) of the states; `fingerprint` (a JSON-able dict) identifies the run the
    states belong to: opening a store written for another run raises `StateMismatch`.
    """

    def __init__(self, path, *, shape: tuple[int, int, int], fingerprint: dict, synchronous: str = "normal"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(x) for x in shape)
        self._write_lock = threading.Lock()   # one writer transaction at a time in this process
        self._read_lock = threading.Lock()
        self._writer = self._connect(synchronous)
        self._reader = self._connect(synchronous)
        self._check_meta({"shape": list(self.shape), "run": fingerprint})
        self._data_version = self._version()

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
        with self.transaction() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            for key, value in meta.items():
                text = json.dumps(value, sort_keys=True)
                if key not in stored:
                    db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, text))
                elif stored[key] != text:
                    raise StateMismatch(
                        f"{self.path} holds states of another run ({key}: stored {stored[key]}, this run {text}). "
                        "Serve this run with another state file, or delete that one to start over.")

    # ---- writing
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock, also against other processes) ... COMMIT, or ROLLBACK on error."""
        with self._write_lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def next_seq(db: sqlite3.Connection) -> int:
        """Inside a transaction: the log position the next event gets (1 + the last one's; events are never
        deleted). A writer compares it with the position up to which it applied the log, so that it replays
        other processes' events only when there are any."""
        return db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]

    @staticmethod
    def insert_events(db: sqlite3.Connection, rows: list[tuple], first: int | None = None) -> int:
        """Append events (person, timestamp, item, category, action, platform, raw_json) inside a transaction, at
        log positions first, first + 1, ... (default: `next_seq`); returns first.

        One INSERT statement of up to 64 rows, not one execution per row (about half the time for 32 rows; in
        stores made before the log dropped AUTOINCREMENT, each execution also rewrote its counter). The
        statements of each size are compiled once (the connection's statement cache)."""
        if first is None:
            first = StateStore.next_seq(db)
        for lo in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[lo:lo + _INSERT_CHUNK]
            params = [x for i, row in enumerate(chunk, first + lo) for x in (i, *row)]
            db.execute(_insert_sql(len(chunk)), params)
        return first

    def append_events(self, rows: list[tuple], after: int) -> int | None:
        """Append events (as `insert_events`) at log positions after + 1, after + 2, ... if the log ends at
        position `after`, i.e. no other process appended since the caller applied the log up to there; returns
        after + 1 — the events are committed, hence durable — or None (nothing written: the log has moved on, or
        the rows do not fit one statement); the caller then takes a transaction, catches up and inserts.

        Why: the request path of an append is one event, and a transaction of its own (BEGIN IMMEDIATE, a query
        of the log's end, the INSERT, COMMIT) cost about twice the INSERT alone. Here the INSERT is the whole
        transaction (SQLite runs a statement outside BEGIN as one), and the primary key checks the log's end
        within it: log positions have no gaps (every writer appends at the end; nothing is deleted), so the log
        ends at `after` exactly when position after + 1 is free, and else the INSERT fails as a whole."""
        if not 0 < len(rows) <= _INSERT_CHUNK:
            return None
        first = after + 1
        params = [x for i, row in enumerate(rows, first) for x in (i, *row)]
        with self._write_lock:
            try:
                self._writer.execute(_insert_sql(len(rows)), params)
            except sqlite3.IntegrityError:   # position after + 1 is taken (the only constraint these rows can break)
                return None
        return first

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
        `watermark`: the caller's states reflect every event up to it."""
        with self.transaction() as db:
            self.put_states(db, records)
            db.execute("INSERT INTO meta (key, value) VALUES ('watermark', ?) ON CONFLICT (key) DO UPDATE SET "
                       "value = excluded.value WHERE CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER)",
                       (str(int(watermark)),))

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

    def watermark(self) -> int:
        """The log position up to which the states table reflects every event (0: none)."""
        with self._read_lock:
            row = self._reader.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
        return int(row[0]) if row else 0

    def events_since(self, seq: int, db: sqlite3.Connection | None = None, chunk: int = 1024) -> Iterator[list[tuple]]:
        """The events after log position `seq`, in log order, as lists of at most `chunk` tuples (seq, person,
        item, category, action, platform, timestamp). With db: inside the caller's transaction."""
        query = ("SELECT seq, person, item, category, action, platform, timestamp FROM events WHERE seq > ? "
                 "ORDER BY seq")
        if db is not None:
            cur = db.execute(query, (int(seq),))
            while rows := cur.fetchmany(chunk):
                yield rows
            return
        with self._read_lock:
            cur = self._reader.execute(query, (int(seq),))
            while rows := cur.fetchmany(chunk):
                yield rows

    def _version(self) -> int:
        return int(self._reader.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        """True when another connection (another process, or this store's writer) committed since the
        last call."""
        with self._read_lock:
            v = self._version()
            if v == self._data_version:
                return False
            self._data_version = v
            return True

    def events_of(self, person: str) -> list[dict]:
        """The appended events of a person, oldest first (the raw dicts as they were sent)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT raw FROM events WHERE person = ? ORDER BY seq", (str(person),))
            return [json.loads(r[0]) for r in rows]

    def last_seq(self) -> int:
        """The log position of the last committed event (0: none).

        Asked on the writer connection when no transaction of this process holds it: SQLite drops a
        connection's page cache whenever another connection has committed, so on the reader, after every
        append of this process, this query re-read its pages (about twice the time); the writer's cache
        survives its own commits. While this process is writing, the reader answers (a read never waits for
        an append)."""
        query = "SELECT COALESCE(MAX(seq), 0) FROM events"
        if self._write_lock.acquire(blocking=False):
            try:
                return int(self._writer.execute(query).fetchone()[0])
            finally:
                self._write_lock.release()
        with self._read_lock:
            return int(self._reader.execute(query).fetchone()[0])

    def count_events(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for conn in (self._reader, self._writer):
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
