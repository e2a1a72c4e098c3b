"""`Session`: a trained run loaded for serving, with every person's sequence state in memory.

    from fastinterest.serve import Session
    s = Session("runs/demo")                                  # safetensors + JSON only, no pickle
    s.interests("043fca71fee157a6...", k=5)                   # a known person (pseudonym or prepared id)
    s.interests(events=[{"platform": "shop", "action": "view", "item_id": "I1000262",
                         "timestamp": 1704164136, "category": "laptops"}])      # a history sent inline
    s.append("043fca71fee157a6...", [event, ...])             # absorb new events: O(new events)
    s.recommend(person, k=10); s.similar(person, k=10); s.target(category="laptops", k=100)
    s.interests_batch(["p1", "p2"], k=5)                      # batch forms: lists in, lists out

What a person is
----------------
At load, every person of the run's prepared data set gets a state: the LSTM run over their last
`max_len` events (the run's window), keyed by pseudonym (and by the prepared numeric id as an alias).
`append(person, events)` advances that state by the new events only — `EmbeddingLSTM.step` for one
event per person, a forward from the stored (h, c) for more — and commits the events to the state
file's log before it returns; the states themselves live in memory and are checkpointed to the file
behind the log (every `checkpoint_every` events and at close; a restart replays the log after the last
checkpoint; see `fastinterest.serve.state`). A person never seen before starts from the
zero state with their first append. So the state of a person is always the model run over the stream
"prepared window, then every appended event in arrival order" (events of one append call are put in
time order; events are never re-sorted across calls).

The user vector is the model's: [top-layer h ; category shares of the window] (`InterestModel.user_from_state`),
and the item head adds the model's repeat term from the window's items. The window holds the ids of the
person's last `max_len` events.

Cold start: a person with no events (unknown key, or an empty inline history) is answered from
popularity — category and item counts of the training vocabulary — with `"source": "popularity"`;
`similar` answers them with the persons closest to the average person.

`recompute=True` turns the sequence state off: every answer for a known person runs the LSTM over their
window again, and appends only extend the window — what a service built on layers without per-person
state must do. It is the baseline of `benchmarks/bench_serve.py`, and equals the stateful answers while a
person's stream fits in the window.

The request path
----------------
An append of one event to each of some known persons (what the service's micro-batches are made of)
takes the short path, in buffers allocated once per batch size: one compiled call copies the persons'
states into the step inputs and slides their windows (`fastpath.prepare`), the LSTM advances by one fused
kernel call bound to those buffers at first use (`FusedEngine.bind_step`; the engine's `step` otherwise),
and one compiled call writes the results back (`fastpath.publish`; numba when installed, numpy otherwise,
both checked against the reference code at load). With a state file the events are one record written at the
end of the event log file, before the states are published (`StateStore.append_events`: one write()). `interests` of known
persons runs the interest head and the top-k in one compiled call straight from the state arrays (numpy
otherwise). Unit vectors (for `similar`) are normalised when read, not on every append. Any other append
(new persons, several events, a person twice in one batch) takes the general path; both give the same
states.

Threads
-------
One model in memory serves any number of threads: the weights are read-only, the engine's caches are
built at load, reads copy the rows they need under a lock, and appends are serialised (one batch at a
time; batch many persons in one call for throughput). Nothing builds an autograd graph (the weights do
not require gradients; torch modules run under `torch.no_grad()`); inputs and outputs are plain Python
and numpy values.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch

from ..apps.run import Run
from . import fastpath
from .engine import make_engine
from .events import FIELDS, EncodedEvents, EventEncoder, EventError
from .state import PersonStates, StateRecord, StateStore, run_fingerprint

__all__ = ["EventError", "Session"]

MEMORY = ":memory:"
ITEM, CATEGORY = FIELDS.index("item"), FIELDS.index("category")


@dataclass
class _Subjects:
    """The rows a read call is about: user vectors and windows, plus who they are."""

    user: np.ndarray         # float32 [n, U] (zeros where cold)
    window: np.ndarray       # int64 [n, 4, W] ids of the last W events per field (FIELDS order)
    n_events: np.ndarray     # int64 [n]
    rows: np.ndarray         # int64 [n]: the person's row, -1 for inline histories and unknown persons
    keys: list               # the person's key (None for inline histories)
    known: np.ndarray        # bool [n]: has at least one event (else: cold start)
    win_len: np.ndarray      # int64 [n]: valid entries of the window

    @property
    def win_item(self) -> np.ndarray:
        return self.window[:, ITEM]


_json_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
try:   # the C encoder of `json`, made once: `JSONEncoder.encode` makes one per call, about half the time of a raw event
    from json.encoder import c_make_encoder as _c_make_encoder, encode_basestring_ascii as _encode_basestring_ascii

    _c_encode = _c_make_encoder(None, str, _encode_basestring_ascii, None, ":", ",", False, False, True)
except (ImportError, TypeError):  # pragma: no cover - another Python's json
    _c_encode = None


def _raw_json(raw) -> str:
    """The text of a raw event in the log: `json.dumps(raw, separators=(",", ":"), default=str)`."""
    if _c_encode is not None and type(raw) is dict:
        try:
            return "".join(_c_encode(raw, 0))
        except Exception:  # noqa: BLE001 - (e.g. a circular dict: no marker check here) the error json.dumps gives
            pass
    return _json_encode(raw)


@dataclass
class _PendingAppend:
    """New states computed by an append, not yet visible (`Session._publish`); one row per person."""

    people: list
    events: list             # per person, the EncodedEvents of the batch in order
    counts: np.ndarray       # int64 [B] new events per person
    h: np.ndarray            # float32 [B, L, H]
    c: np.ndarray
    window: np.ndarray       # int32 [B, 4, W]
    n_events: np.ndarray     # int64 [B]
    user: np.ndarray         # float32 [B, U]
    results: list            # one dict per request
    last_seq: np.ndarray | None = None

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def number_events(self, first: int) -> None:
        """Log positions first, first + 1, ... to the events in person order; last_seq per person."""
        self.last_seq = (first - 1 + np.cumsum(self.counts)).astype(np.int64)

    def log_rows(self) -> list[tuple]:
        """The events as rows of the log (`StateStore.insert_events`), in person order."""
        rows = []
        for person, evs in zip(self.people, self.events):
            for e in evs:
                raws = [_raw_json(r) for r in e.raw] if e.raw else ["{}"] * len(e)
                for (item, category, action, platform, timestamp), raw in zip(e.table.tolist(), raws):
                    rows.append((person, timestamp, item, category, action, platform, raw))
        return rows


class _StepBuffers:
    """Everything an append of one event to each of B known, distinct persons works in, allocated once per B
    (`Session._advance_single`; used under the append lock only): the new events' table [B, 5] int64, the persons'
    rows [B], the step's states h0, c0 -> h1, c1 [L, B, H] float32, and what `fastpath.prepare` derives (slid
    windows win [B, 4, W], counts n1 [B], user vectors [B, U]); and `step()`, the LSTM
    step from h0, c0 to h1, c1. Fixed buffers let the step be bound once (`FusedEngine.bind_step`: one kernel
    call per append, no tensors made); any other engine gets its `step` on tensors that share this memory."""

    def __init__(self, engine, L: int, B: int, H: int, W: int, U: int, device: torch.device):
        self.engine, self.device = engine, device
        self.table = np.zeros((B, 5), np.int64)
        self.rows = np.zeros(B, np.int64)
        self.h0, self.c0, self.h1, self.c1 = (np.zeros((L, B, H), np.float32) for _ in range(4))
        self.win = np.zeros((B, 4, W), np.int32)
        self.n1 = np.zeros(B, np.int64)
        self.user = np.zeros((B, U), np.float32)
        table, h0, c0 = (torch.from_numpy(a) for a in (self.table, self.h0, self.c0))
        self._inputs = ([table[:, j] for j in range(4)], (h0, c0))   # ids: the table's id columns, [B] each
        bind = getattr(engine, "bind_step", None)
        bound = bind(self.table, self.h0, self.c0, self.h1, self.c1) if bind and device.type == "cpu" else None
        self.step = bound or self._engine_step

    def _engine_step(self) -> None:
        ids, (h, c) = self._inputs
        if self.device.type != "cpu":
            ids, h, c = [t.to(self.device) for t in ids], h.to(self.device), c.to(self.device)
        h, c = self.engine.step(ids, (h, c))
        torch.from_numpy(self.h1).copy_(h)
        torch.from_numpy(self.c1).copy_(c)


class _SingleAppend:
    """An append computed by `Session._advance_single` in `buf`, not yet visible (`Session._publish`): one event
    to each of B known, distinct persons."""

    __slots__ = ("people", "raws", "buf", "results", "total", "first")

    def __init__(self, people: list, raws: list, buf: _StepBuffers, results: list):
        self.people, self.raws, self.buf, self.results = people, raws, buf, results
        self.total = len(people)
        self.first = 0   # the log position of the first person's event; the others follow in order

    def number_events(self, first: int) -> None:
        self.first = first

    def log_rows(self) -> list[tuple]:
        return [(person, timestamp, item, category, action, platform, _raw_json(raw))
                for person, raw, (item, category, action, platform, timestamp)
                in zip(self.people, self.raws, self.buf.table.tolist())]


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices of the k largest scores, best first (ties: lower index first)."""
    n, V = scores.shape
    k = max(0, min(int(k), V))
    if k == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), scores.dtype)
    rows = np.arange(n)[:, None]
    if k < V // 4 and V > 256:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        cand.sort(axis=1)  # index order first, so the stable sort below breaks ties by index
        order = np.argsort(-scores[rows, cand], axis=1, kind="stable")
        idx = cand[rows, order]
    else:
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, scores[rows, idx]


def _person_key(person) -> str:
    if type(person) is str and person:   # the usual case, checked first: this runs for every person of a request
        return person
    if isinstance(person, bool) or not isinstance(person, (str, int, np.integer)):
        raise TypeError(f"a person is a string or an integer id, got {type(person).__name__}")
    key = str(person)
    if not key:
        raise ValueError("a person key must not be empty")
    return key


def _ids_matrix(encoded: Sequence[Sequence[EncodedEvents]], counts: np.ndarray) -> np.ndarray:
    """[B, 4, T] ids (left-aligned) of the events of each row; row b holds the events of encoded[b] in order."""
    B, T = len(encoded), max(1, int(counts.max(initial=0)))
    flat = np.concatenate([e.ids for evs in encoded for e in evs])  # [N, 4]
    if T == 1 and len(flat) == B:  # one new event per row: the common case
        return flat.reshape(B, 4, 1)
    out = np.zeros((B, 4, T), np.int64)
    owner = np.repeat(np.arange(B), counts)
    pos = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[owner, :, pos] = flat
    return out


class Session:
    """A trained run ready to serve (see the module docstring).

    Args:
        run_dir: a run directory (`fastinterest train --out RUN`).
        device: where the model runs ("cpu", "cuda"); states live in host memory.
        backend: force a fastinterest LSTM kernel backend ("ext", "numba", "triton", "reference").
        layers: "fastinterest" (fused kernels) or "torch" (stock torch.nn layers; same answers).
        state: the state file that makes appends durable (default RUN/serving/state.sqlite3: a SQLite
            checkpoint of the states, with the event log beside it in STATE.log); ":memory:" keeps appended
            state in memory only.
        prepared: the prepared data set whose persons are known at load (default: the run's); False: none.
        synchronous: "normal" (durable when the process dies, the default) or "full" (also when the
            machine loses power; an fdatasync of the log per append batch).
        max_len: the window of events the history features read (default: the run's max_len).
        recompute: no sequence state: recompute known persons from their window on every read (the
            stateless baseline, see the module docstring).
        checkpoint_every: with a state file, write the changed states to it (a checkpoint) after this many
            appended events, and at close; a restart replays the events after the last checkpoint. A checkpoint
            writes one row per person changed since the last one (about 50 µs each on a 2-core machine) and
            delays the append that triggers it by that much.
    """

    def __init__(self, run_dir, device: str = "cpu", backend: str | None = None, *, layers: str = "fastinterest",
                 state=None, prepared=None, synchronous: str = "normal", max_len: int | None = None,
                 recompute: bool = False, load_batch: int = 512, checkpoint_every: int = 2000):
        self.run_dir = Path(run_dir)
        if layers not in ("fastinterest", "torch"):
            raise ValueError(f"layers must be 'fastinterest' or 'torch', not {layers!r}")
        self.run = Run.load(self.run_dir, device=device, layers=layers)
        self.model = self.run.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.engine = make_engine(self.model, layers, backend)
        self.layers = self.engine.name
        with torch.no_grad():
            self.engine.warm_up()
        self.recompute = bool(recompute)
        self.window = int(max_len or self.run.data_params["max_len"])
        self.encoder = EventEncoder(self.run.vocab)
        for f in FIELDS:  # every id the encoder can produce must have an embedding row
            rows = getattr(self.model.encoder.embeddings, f).num_embeddings
            if len(self.run.tokens(f)) > rows:
                raise ValueError(f"{self.run_dir}: the {f} vocabulary has {len(self.run.tokens(f))} tokens but the "
                                 f"model's {f} table only {rows} rows (vocab.json does not belong to these weights)")
        self.item_tokens = self.run.tokens("item")
        self.category_tokens = self.run.tokens("category")
        self._category_id = {t: i for i, t in enumerate(self.category_tokens)}
        self._item_id = {t: i for i, t in enumerate(self.item_tokens)}
        self._popularity()
        self._fast_user = self._check_fast_user()
        self._fast_head = None
        self._fast_head = self._check_fast_head()
        self._head_topk = self._check_head_topk()
        self._fp = self._check_fastpath()
        self._num_categories, self._history_share = int(self.model.num_categories), bool(self.model.history_share)
        self._buffers: dict[int, _StepBuffers] = {}   # per batch size, for `_advance_single`

        self._lock = threading.RLock()          # guards self.states (reads copy rows under it)
        self._append_lock = threading.Lock()    # one append batch at a time
        L, H = self.engine.num_layers, self.engine.hidden_size
        self.states = PersonStates(L, H, self.window, int(self.model.user_dim))
        self._synced_seq = 0                    # the store's log position up to which this process applied all
        self._local_seq = 0                     # log positions of appends without a store
        self._dirty: set[int] = set()           # rows changed since this process's last checkpoint
        self._unsaved = 0                       # events applied since then
        self.checkpoint_every = int(checkpoint_every)

        prepared_dir = self._prepared_dir(prepared)
        if prepared_dir is not None:
            self._load_prepared(prepared_dir, load_batch)
        self.store: StateStore | None = None
        if state != MEMORY:
            path = Path(state) if state is not None else self.run_dir / "serving" / "state.sqlite3"
            self.store = StateStore(path, shape=(L, H, self.window), synchronous=synchronous,
                                    fingerprint=run_fingerprint(self.run_dir, self.window, prepared_dir, self.recompute))
            with self._append_lock:   # the checkpoint, then the events after it
                records, self._synced_seq = self.store.load_checkpoint()
                self._apply_records(records)
                self._catch_up()

    # ------------------------------------------------------------------ loading
    def _popularity(self) -> None:
        """Cold-start answers: shares of the training events per category and per item, best first."""
        def ranked(field, score_name):
            tokens = self.run.tokens(field)
            counts = np.asarray(self.run.vocab[field].get("counts") or [0] * len(tokens), np.float64)
            counts[:2] = 0.0  # <pad>, <unk>
            shares = counts / counts.sum() if counts.sum() > 0 else counts
            return [{field: tokens[i], score_name: float(shares[i])}
                    for i in np.argsort(-shares, kind="stable").tolist() if shares[i] > 0]

        self._cat_pop_answer = ranked("category", "probability")
        self._item_pop_answer = ranked("item", "score")

    def _prepared_dir(self, prepared):
        if prepared is False:
            return None
        if prepared is not None:
            path = Path(prepared)
            if not (path / "events.parquet").exists():
                raise FileNotFoundError(f"{path}: not a prepared directory (no events.parquet)")
            return path
        recorded = self.run.prepared_dir
        if recorded and (Path(recorded) / "events.parquet").exists():
            return Path(recorded)
        warnings.warn(f"the run's prepared data ({recorded}) is not available: no person is known at load; "
                      "persons become known as events are appended", stacklevel=3)
        return None

    def _load_prepared(self, prepared_dir: Path, batch: int) -> None:
        """States of every prepared person from their last `window` events."""
        from ..data import build_person_histories, load_prepared

        prepared = load_prepared(prepared_dir)
        hist = build_person_histories(prepared, self.window)
        P = len(hist)
        names: dict[int, str] = {}
        persons_file = prepared_dir / "persons.parquet"
        if persons_file.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(persons_file, columns=["person", "pseudonym"])
            names = dict(zip(table.column("person").to_pylist(), table.column("pseudonym").to_pylist()))
        totals = np.diff(prepared.person_offsets)[:P] if P else np.zeros(0, np.int64)
        W = self.window
        for lo in range(0, P, batch):
            hi = min(P, lo + batch)
            lengths = np.asarray(hist.lengths[lo:hi], np.int64)
            window = np.zeros((hi - lo, 4, W), np.int32)
            for j, f in enumerate(FIELDS):
                window[:, j] = np.asarray(getattr(hist, f)[lo:hi, :W])
            h, c, user = self._run_windows(window, lengths)
            rows = []
            for p in range(lo, hi):
                person_id = int(hist.person[p])
                r = self.states.add(str(names.get(person_id, person_id)))
                self.states.alias(str(person_id), r)
                rows.append(r)
            self.states.set_rows(np.asarray(rows), h, c, window, totals[lo:hi], np.zeros(hi - lo, np.int64), user)

    # ------------------------------------------------------------------ model pieces
    def _run_windows(self, window: np.ndarray, lengths: np.ndarray):
        """The LSTM from the zero state over windows [R, 4, W'] with `lengths` valid events:
        (h [R, L, H], c [R, L, H], user vectors [R, U]) as numpy."""
        width = max(1, int(lengths.max(initial=0)))
        ids = [torch.as_tensor(np.asarray(window[:, j, :width], np.int64), device=self.device) for j in range(4)]
        h, c = self.engine.run(ids, torch.as_tensor(np.asarray(lengths, np.int64)))
        h_np = h.transpose(0, 1).float().cpu().numpy()
        return h_np, c.transpose(0, 1).float().cpu().numpy(), self._user_vectors(h_np[:, -1], window[:, CATEGORY],
                                                                                  lengths)

    def _user_vectors(self, h: np.ndarray, win_cat: np.ndarray, win_len: np.ndarray) -> np.ndarray:
        """User vectors [R, U] from top-layer states h [R, H] and the windows' categories [R, W]."""
        win_len = np.minimum(np.asarray(win_len, np.int64), self.window)
        if self._fast_user:
            return self._user_numpy(np.asarray(h, np.float32), np.asarray(win_cat), win_len)
        return self._user_model(h, win_cat, win_len)

    @torch.no_grad()
    def _user_model(self, h: np.ndarray, win_cat: np.ndarray, win_len: np.ndarray) -> np.ndarray:
        """The model's own definition (`InterestModel.user_from_state`)."""
        cats = torch.as_tensor(np.asarray(win_cat, np.int64), device=self.device)
        return self.model.user_from_state(torch.as_tensor(np.asarray(h, np.float32), device=self.device), cats,
                                          torch.as_tensor(win_len)).float().cpu().numpy()

    def _user_numpy(self, h: np.ndarray, win_cat: np.ndarray, win_len: np.ndarray) -> np.ndarray:
        """The same in numpy, ~10x cheaper for the few rows of a request: [h ; share of the window's events
        per category] (categories < 2, pad and unk, not counted). Checked against the model at load."""
        if not self.model.history_share:
            return np.ascontiguousarray(h, np.float32)
        R, W = win_cat.shape
        C = self.model.num_categories
        if R == 1:   # the same numbers with fewer numpy calls (one person: the request path)
            cats = win_cat[0, : int(win_len[0])]
            cats = cats[cats >= 2]
            share = np.bincount(cats, minlength=C).astype(np.float32) / np.float32(max(len(cats), 1))
            return np.concatenate([h, share[None]], axis=1)
        counted = (np.arange(W)[None, :] < win_len[:, None]) & (win_cat >= 2)
        rows = np.nonzero(counted)[0]
        counts = np.bincount(rows * C + win_cat[counted], minlength=R * C).reshape(R, C).astype(np.float32)
        share = counts / np.maximum(counted.sum(1, keepdims=True), 1).astype(np.float32)
        return np.concatenate([h, share], axis=1)

    def _check_fast_user(self) -> bool:
        """Use `_user_numpy` only if it reproduces the model's user vectors (else warn and use the model)."""
        rng = np.random.default_rng(0)
        R, W, C = 5, self.window, self.model.num_categories
        h = rng.standard_normal((R, self.engine.hidden_size)).astype(np.float32)
        cats = rng.integers(0, C, (R, W))
        lens = np.minimum(np.asarray([0, 1, W // 2, W, W + 7]), W)
        try:
            ref = self._user_model(h, cats, lens)
            same = np.allclose(self._user_numpy(h, cats, lens), ref, atol=1e-6) and all(
                np.allclose(self._user_numpy(h[i:i + 1], cats[i:i + 1], lens[i:i + 1]), ref[i:i + 1], atol=1e-6)
                for i in range(R))   # the one-row path too
        except Exception:  # noqa: BLE001 - any mismatch in shape or definition: use the model's code
            same = False
        if not same:
            warnings.warn("the model's user vector is not [h ; category shares]: serving computes it with the model "
                          "(slower per request)", stacklevel=3)
        return same

    def _interest_probs(self, user: np.ndarray) -> np.ndarray:
        """Interest probabilities [n, C] (float32) of user vectors [n, U]."""
        if self._fast_head is not None:   # numpy: no torch dispatch for the few rows of a request
            wt, b = self._fast_head
            z = user @ wt
            z += b
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += 1.0
            return np.reciprocal(z, out=z)
        with torch.no_grad():
            return torch.sigmoid(self.model.interest_logits(self._tensor(user))).float().cpu().numpy()

    def _check_fast_head(self):
        """(W^T [U, C], b [C]) float32 numpy copies of the interest head, if the model's `interest_logits` is that
        linear map on the CPU and numpy reproduces its probabilities; else None (the model's code runs)."""
        head = getattr(self.model, "interest_head", None)
        if self.device.type != "cpu" or not isinstance(head, torch.nn.Linear) or head.bias is None:
            return None
        fast = (np.ascontiguousarray(head.weight.detach().float().numpy().T), head.bias.detach().float().numpy().copy())
        rng = np.random.default_rng(1)
        user = rng.standard_normal((7, self.model.user_dim)).astype(np.float32)
        with torch.no_grad():
            ref = torch.sigmoid(self.model.interest_logits(torch.from_numpy(user))).float().numpy()
        self._fast_head = fast
        try:
            same = np.allclose(self._interest_probs(user), ref, rtol=0, atol=1e-6)
        finally:
            self._fast_head = None
        return fast if same else None

    def _check_head_topk(self):
        """The compiled `fastpath.head_topk` if it ranks like the numpy head + `_top_k` (the same ids, the same
        probabilities within 1e-6) on random user vectors, read through rows in another order; else None (numpy)."""
        fn = fastpath.compiled_head_topk()
        if fn is None or self._fast_head is None:
            return None
        wt, b = self._fast_head
        C = wt.shape[1]
        rng = np.random.default_rng(2)
        user = rng.standard_normal((9, wt.shape[0])).astype(np.float32)
        rows = rng.permutation(len(user))[:7]
        try:
            for k in (1, min(10, C), C):
                probs = self._interest_probs(user[rows])
                probs[:, :2] = -np.inf
                idx_ref, val_ref = _top_k(probs, k)
                idx, val = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float32)
                fn(user, rows, wt, b, idx, val)
                if not (np.array_equal(idx, idx_ref) and np.allclose(val, val_ref, rtol=0, atol=1e-6)):
                    warnings.warn("fastpath.head_topk differs from the numpy head: interests use numpy", stacklevel=3)
                    return None
        except Exception as exc:  # noqa: BLE001 - a compile or run failure: use numpy
            warnings.warn(f"fastpath.head_topk failed ({type(exc).__name__}: {exc}): interests use numpy",
                          stacklevel=3)
            return None
        return fn

    def _check_fastpath(self) -> fastpath.Functions | None:
        """The `fastpath` functions for `_advance_single`: the compiled ones if they give exactly what their numpy
        reference gives on states of this run's shapes (compiling them, or loading them from numba's cache, on
        the way), else the numpy ones; None (every append takes `_advance_general`) when the user vectors they
        derive are not the model's."""
        if not self._fast_user:
            return None
        fp = fastpath.compiled() or fastpath.NUMPY
        L, H, W = self.engine.num_layers, self.engine.hidden_size, self.window
        C, share = self.model.num_categories, self.model.history_share
        U = int(self.model.user_dim)
        rng = np.random.default_rng(0)
        P = 7
        state = {"h": rng.standard_normal((P, L, H)).astype(np.float32),
                 "c": rng.standard_normal((P, L, H)).astype(np.float32),
                 "window": rng.integers(0, C, (P, 4, W)).astype(np.int32),
                 "n_events": np.asarray([0, 1, W - 1, W, W + 5, 3, 2 * W], np.int64),
                 "last_seq": np.asarray([0, 5, 9, 0, 2, 7, 1], np.int64),
                 "user": np.zeros((P, U), np.float32), "stale": np.zeros(P, bool)}
        rows = np.asarray([4, 0, 2, 3, 6, 1], np.int64)
        table = rng.integers(0, C, (len(rows), 5)).astype(np.int64)
        first = 2   # log positions 2, 3, ..., 7: rows 4 and 2 hold states as new or newer (not written)
        outs = []
        try:
            for impl in (fastpath.NUMPY, fp):
                st = {k: v.copy() for k, v in state.items()}
                B = len(rows)
                h0, c0 = np.empty((L, B, H), np.float32), np.empty((L, B, H), np.float32)
                win, n1, user = np.empty((B, 4, W), np.int32), np.empty(B, np.int64), np.empty((B, U), np.float32)
                impl.prepare(st["h"], st["c"], st["window"], st["n_events"], rows, table, C, share, h0, c0, win, n1,
                             user)
                h1 = np.ascontiguousarray(h0[::-1])  # any new state
                written = impl.publish(st["h"], st["c"], st["window"], st["n_events"], st["last_seq"], st["user"],
                                       st["stale"], rows, h1, c0, win, n1, first, user)
                outs.append([h0, c0, win, n1, user, np.asarray(written), *st.values()])
                if impl is fastpath.NUMPY and not np.allclose(user, self._user_vectors(h1[-1], win[:, 1], n1),
                                                              atol=1e-6):
                    warnings.warn("fastpath: its user vectors are not the model's; append takes the general path",
                                  stacklevel=3)
                    return None
                if fp is fastpath.NUMPY:
                    return fp
            same = all(np.array_equal(a, b) for a, b in zip(*outs))
        except Exception as exc:  # noqa: BLE001 - a compile or run failure: use numpy
            warnings.warn(f"fastpath: the compiled (numba) functions failed ({type(exc).__name__}: {exc}); "
                          "append uses numpy (slower per request)", stacklevel=3)
            return fastpath.NUMPY
        if not same:
            warnings.warn("fastpath: the compiled (numba) functions differ from numpy; append uses numpy (slower "
                          "per request)", stacklevel=3)
            return fastpath.NUMPY
        return fp

    def _tensor(self, a, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ inputs
    def encode_events(self, events) -> EncodedEvents:
        """Validate and encode raw event dicts (raises EventError naming the bad event and field)."""
        if isinstance(events, EncodedEvents):
            return events
        return self.encoder.encode(events)

    def category_id(self, category) -> int:
        """The vocabulary id of a category token (KeyError when the run does not know it)."""
        idx = self._category_id.get(str(category))
        if idx is None or idx < 2:
            raise KeyError(f"unknown category {category!r}")
        return idx

    def item_id(self, item) -> int:
        idx = self._item_id.get(str(item))
        if idx is None or idx < 2:
            raise KeyError(f"unknown item {item!r}")
        return idx

    # ------------------------------------------------------------------ reading states
    def _sync(self) -> None:
        """Pick up the events that other processes sharing the store appended."""
        # One fstat of the log file against where this process read it up to (`StateStore.has_new`): no query, no
        # reading. A read waits for the append lock only when the log holds events this process has not applied.
        if self.store is not None and self.store.has_new(self._synced_seq):
            with self._append_lock:
                self._catch_up()

    def _catch_up(self) -> None:
        """Apply the log's events after `_synced_seq` (other processes' appends; at load, the events after the
        checkpoint), in log order, a chunk at a time. Call with the append lock held (before an append that
        found the log moved on: inside the store's `transaction()`)."""
        for rows in self.store.events_since(self._synced_seq):
            self._replay(rows)
            self._synced_seq = int(rows[-1][0])

    def _replay(self, rows: list[tuple]) -> None:
        """Advance the persons of logged events (seq, person, item, category, action, platform, timestamp), in log
        order, skipping the events a person's state already holds (its last_seq)."""
        per: dict[str, list[tuple]] = {}
        with self._lock:
            st = self.states
            for seq, person, *ids in rows:
                r = st.index.get(person)
                if r is None or seq > st.last_seq[r]:
                    per.setdefault(person, []).append((seq, *ids))
        if not per:
            return
        people = list(per)
        encoded = [EncodedEvents(np.asarray([e[1:] for e in evs], np.int64)) for evs in per.values()]
        pending = self._advance_general(people, encoded)
        pending.last_seq = np.asarray([evs[-1][0] for evs in per.values()], np.int64)
        self._publish(pending)

    def _apply_records(self, records: Sequence[StateRecord]) -> None:
        if not records:
            return
        with self._lock:
            fresh = []
            for rec in records:
                r = self.states.add(rec.person)
                if rec.last_seq > self.states.last_seq[r]:
                    fresh.append((r, rec))
            if fresh:
                rows = np.asarray([r for r, _ in fresh])
                h = np.stack([rec.h for _, rec in fresh])
                c = np.stack([rec.c for _, rec in fresh])
                window = np.stack([rec.window for _, rec in fresh])
                n = np.asarray([rec.n_events for _, rec in fresh], np.int64)
                seq = np.asarray([rec.last_seq for _, rec in fresh], np.int64)
                user = self._user_vectors(h[:, -1], window[:, CATEGORY], n)
                self.states.set_rows(rows, h, c, window, n, seq, user)

    def _subjects(self, persons, events, need_window: bool = True) -> _Subjects:
        """Resolve a batch of read requests: row i is persons[i] (a key) or events[i] (an inline history).

        need_window=False: the caller reads only user vectors and counts, so known persons' windows are not
        copied (`window` is then only filled for inline histories; recompute=True always fills it)."""
        if persons is None and events is None:
            raise ValueError("give persons or events")
        n = len(persons) if persons is not None else len(events)
        if persons is not None and events is not None and len(events) != n:
            raise ValueError(f"{len(persons)} persons but {len(events)} event lists")
        W = self.window
        need_window = need_window or self.recompute or events is not None
        if events is None and n and all(p is not None for p in persons):   # the usual read: persons by key
            found = self._known_subjects([_person_key(p) for p in persons], need_window)
            if found is not None:
                return found
        user = np.zeros((n, self.states.user_dim), np.float32)
        window = np.zeros((n, 4, W) if need_window else (n, 4, 0), np.int64)
        n_events = np.zeros(n, np.int64)
        rows = np.full(n, -1, np.int64)
        keys: list = [None] * n
        inline: list[tuple[int, EncodedEvents]] = []
        lookups: list[tuple[int, str]] = []
        for i in range(n):
            person = persons[i] if persons is not None else None
            ev = events[i] if events is not None else None
            if (person is None) == (ev is None):
                raise ValueError(f"request {i}: give exactly one of person or events")
            if person is not None:
                lookups.append((i, _person_key(person)))
            else:
                inline.append((i, self.encode_events(ev).tail(W)))
        if lookups:
            self._sync()
            with self._lock:
                st = self.states
                for i, key in lookups:
                    r = st.index.get(key)
                    keys[i] = st.keys[r] if r is not None else key
                    rows[i] = -1 if r is None else r
                if len(lookups) == n and rows.min(initial=0) >= 0:   # every row a known person
                    user[:], n_events[:] = st.user[rows], st.n_events[rows]
                    if need_window:
                        window[:] = st.window[rows]
                else:
                    idx = np.asarray([i for i, _ in lookups if rows[i] >= 0], np.int64)
                    r = rows[idx]
                    user[idx], n_events[idx] = st.user[r], st.n_events[r]
                    if need_window:
                        window[idx] = st.window[r]
        win_len = np.minimum(n_events, W)
        if self.recompute and lookups:  # no sequence state: run the LSTM over each known person's window
            idx = np.flatnonzero((rows >= 0) & (n_events > 0))
            if len(idx):
                user[idx] = self._run_windows(window[idx], win_len[idx])[2]
        if inline:
            idx = np.asarray([i for i, _ in inline], np.int64)
            lengths = np.asarray([len(e) for _, e in inline], np.int64)
            for i, e in inline:
                window[i, :, : len(e)] = e.ids.T
            n_events[idx] = win_len[idx] = lengths
            user[idx] = self._run_windows(window[idx], lengths)[2]
        return _Subjects(user, window, n_events, rows, keys, n_events > 0, win_len)

    def _known_subjects(self, keys: list[str], need_window: bool) -> _Subjects | None:
        """`_subjects` when every key is a known person (None when one is not): the rows' states copied in one
        gather each."""
        self._sync()
        with self._lock:
            st = self.states
            found = [st.index.get(key) for key in keys]
            if None in found:
                return None
            rows = np.asarray(found, np.int64)
            user, n_events = st.user[rows], st.n_events[rows]
            window = st.window[rows].astype(np.int64) if need_window else np.zeros((len(keys), 4, 0), np.int64)
            skeys = st.keys
            keys = [skeys[r] for r in found]
        win_len = np.minimum(n_events, self.window)
        known = n_events > 0
        if self.recompute:  # no sequence state: run the LSTM over each known person's window
            idx = np.flatnonzero(known)
            if len(idx):
                user[idx] = self._run_windows(window[idx], win_len[idx])[2]
        return _Subjects(user, window, n_events, rows, keys, known, win_len)

    @staticmethod
    def _ks(k, n: int) -> list[int]:
        if not isinstance(k, (list, tuple, np.ndarray)):   # one k for every row: check it once
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"k must be a positive integer, got {k!r}")
            return [int(k)] * n
        ks = list(k)
        if len(ks) != n:
            raise ValueError(f"{len(ks)} values of k for {n} requests")
        for v in ks:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"k must be a positive integer, got {v!r}")
        return [int(v) for v in ks]

    @staticmethod
    def _rows(n: int, values, name: str) -> list:
        if values is None or not isinstance(values, (list, tuple)):
            return [values] * n
        if len(values) != n:
            raise ValueError(f"{len(values)} values of {name} for {n} requests")
        return list(values)

    # ------------------------------------------------------------------ interests
    def interests(self, person=None, *, events=None, k: int = 10) -> dict:
        """Top-k categories by interest probability, for a person or an inline history of raw events.

        Returns {"person", "source": "model"|"popularity", "n_events", "interests": [{"category", "probability"}]}."""
        return self.interests_batch(None if person is None else [person], events=None if events is None else [events],
                                    k=k)[0]

    def interests_batch(self, persons=None, *, events=None, k=10) -> list[dict]:
        """Batch form of `interests`: persons[i] or events[i] per row (the other None); k an int or a list."""
        known = self._known_interests(persons, k) if events is None and self._head_topk is not None else None
        if known is not None:   # the request path: known persons by key
            keys, n_events, ks, idx, vals = known
        else:
            subj = self._subjects(persons, events, need_window=False)
            keys, n_events = subj.keys, subj.n_events.tolist()
            n = len(keys)
            ks = self._ks(k, n)
            # every row through the head (cold rows are answered from popularity below)
            if self._head_topk is not None:   # compiled: one call for the head and the ranking
                idx, vals = self._topk_buffers(n, ks)
                self._head_topk(subj.user, np.arange(n), self._fast_head[0], self._fast_head[1], idx, vals)
            else:
                probs = self._interest_probs(subj.user)
                probs[:, :2] = -np.inf
                idx, vals = _top_k(probs, max(ks))
        n = len(keys)
        idx, vals = idx.tolist(), vals.tolist()
        tokens = self.category_tokens
        k0 = len(idx[0]) if n else 0
        out = []
        for i in range(n):
            if n_events[i] > 0:
                ids, ps = (idx[i], vals[i]) if ks[i] == k0 else (idx[i][: ks[i]], vals[i][: ks[i]])
                out.append({"person": keys[i], "source": "model", "n_events": n_events[i],
                            "interests": [{"category": tokens[c], "probability": p} for c, p in zip(ids, ps)]})
            else:
                out.append({"person": keys[i], "source": "popularity", "n_events": n_events[i],
                            "interests": [dict(x) for x in self._cat_pop_answer[: ks[i]]]})
        return out

    def _topk_buffers(self, n: int, ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        k = min(max(ks, default=0), self._fast_head[0].shape[1])
        return np.empty((n, k), np.int64), np.empty((n, k), np.float32)

    def _known_interests(self, persons, k):
        """`interests_batch` of persons given by key when every one is known: (their keys, event counts, ks, and
        the top ids and probabilities [n, k] of the compiled head), computed from the state arrays under the lock
        (no copy of the rows first); else None (also with recompute=True, which keeps no user vectors), and the
        caller takes `_subjects`. The same answers in a few operations: the request path of `interests`."""
        if self.recompute or not persons or any(p is None for p in persons):
            return None
        keys = [_person_key(p) for p in persons]
        n = len(keys)
        ks = self._ks(k, n)
        idx, vals = self._topk_buffers(n, ks)
        wt, b = self._fast_head
        self._sync()
        with self._lock:
            st = self.states
            index = st.index
            found = [index.get(key) for key in keys]
            if None in found:
                return None
            rows = np.array(found, np.int64)
            self._head_topk(st.user, rows, wt, b, idx, vals)
            skeys = st.keys
            return [skeys[r] for r in found], st.n_events[rows].tolist(), ks, idx, vals

    # ------------------------------------------------------------------ recommend
    def recommend(self, person=None, *, events=None, k: int = 10, exclude_seen: bool = True) -> dict:
        """Top-k items by the item head's score (items in the person's window left out by default).

        Returns {"person", "source", "n_events", "items": [{"item", "score"}]} (score: the click logit;
        for cold start, the item's share of training events)."""
        return self.recommend_batch(None if person is None else [person], events=None if events is None else [events],
                                    k=k, exclude_seen=exclude_seen)[0]

    @torch.no_grad()
    def recommend_batch(self, persons=None, *, events=None, k=10, exclude_seen=True) -> list[dict]:
        subj = self._subjects(persons, events)
        n = len(subj.rows)
        ks = self._ks(k, n)
        excl = self._rows(n, exclude_seen, "exclude_seen")
        known = np.flatnonzero(subj.known)
        out: list[dict | None] = [None] * n
        if len(known):
            scores = self.model.item_logits(self._tensor(subj.user[known]), None,
                                            self._tensor(subj.win_item[known], torch.long),
                                            self._tensor(subj.win_len[known], torch.long)).float().cpu().numpy()
            scores[:, :2] = -np.inf
            for j, i in enumerate(known):
                if excl[i]:
                    scores[j, subj.win_item[i, : subj.win_len[i]]] = -np.inf
            idx, vals = _top_k(scores, max(ks[i] for i in known))
            idx, vals, tokens = idx.tolist(), vals.tolist(), self.item_tokens
            for j, i in enumerate(known.tolist()):
                items = [{"item": tokens[t], "score": v} for t, v in zip(idx[j][: ks[i]], vals[j][: ks[i]])
                         if v != -np.inf]
                out[i] = {"person": subj.keys[i], "source": "model", "n_events": int(subj.n_events[i]), "items": items}
        for i in np.flatnonzero(~subj.known).tolist():
            out[i] = {"person": subj.keys[i], "source": "popularity", "n_events": 0,
                      "items": [dict(x) for x in self._item_pop_answer[: ks[i]]]}
        return out

    # ------------------------------------------------------------------ the whole population
    def _population(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user vectors [P, U], unit vectors [P, U], known [P] bool) of every row; call with self._lock held.
        Views of the state arrays, or, with recompute=True, recomputed from every known person's window."""
        st = self.states
        P = st.size
        known = st.n_events[:P] > 0
        if not self.recompute:
            return st.user[:P], st.unit[:P], known
        users = np.zeros((P, st.user_dim), np.float32)
        rows = np.flatnonzero(known)
        for lo in range(0, len(rows), 512):
            r = rows[lo:lo + 512]
            users[r] = self._run_windows(st.window[r], np.minimum(st.n_events[r], self.window))[2]
        return users, users / np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12), known

    # ------------------------------------------------------------------ similar
    def similar(self, person=None, *, events=None, k: int = 10) -> dict:
        """The k known persons whose user vectors are closest (cosine) to this person's (the person left out).

        Returns {"person", "source", "n_events", "persons": [{"person", "similarity"}]}; a cold-start person
        gets the persons closest to the average person ("source": "popularity")."""
        return self.similar_batch(None if person is None else [person], events=None if events is None else [events],
                                  k=k)[0]

    def similar_batch(self, persons=None, *, events=None, k=10) -> list[dict]:
        subj = self._subjects(persons, events)
        n = len(subj.rows)
        ks = self._ks(k, n)
        query = subj.user / np.maximum(np.linalg.norm(subj.user, axis=1, keepdims=True), 1e-12)
        with self._lock:
            _, unit, known = self._population()
            cold = ~subj.known
            if cold.any():  # the persons closest to the average person
                mean = unit[known].mean(0) if known.any() else np.zeros(unit.shape[1], np.float32)
                query[cold] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            sims = query @ unit.T                                    # [n, P]
            sims[:, ~known] = -np.inf                                # persons without events are not candidates
            own = np.flatnonzero(subj.rows >= 0)
            sims[own, subj.rows[own]] = -np.inf                      # never the person themself
            idx, vals = _top_k(sims, max(ks))
            idx, vals, keys = idx.tolist(), vals.tolist(), self.states.keys
            out = []
            for i in range(n):
                found = [{"person": keys[r], "similarity": v} for r, v in zip(idx[i][: ks[i]], vals[i][: ks[i]])
                         if v != -np.inf]
                out.append({"person": subj.keys[i], "source": "model" if subj.known[i] else "popularity",
                            "n_events": int(subj.n_events[i]), "persons": found})
        return out

    # ------------------------------------------------------------------ target
    def target(self, category=None, *, item=None, k: int = 100) -> dict:
        """The k known persons most likely to respond to an ad for a category (interest probability) or an
        item (click probability, the item head with the repeat term).

        Returns {"category" or "item", "persons": [{"person", "probability"}]}."""
        return self.target_batch(None if category is None else [category], items=None if item is None else [item],
                                 k=k)[0]

    @torch.no_grad()
    def target_batch(self, categories=None, *, items=None, k=100) -> list[dict]:
        """Batch form of `target`: categories[i] or items[i] per row (the other None)."""
        if categories is None and items is None:
            raise ValueError("give categories or items")
        n = len(categories) if categories is not None else len(items)
        cats = self._rows(n, categories, "categories") if categories is not None else [None] * n
        its = self._rows(n, items, "items") if items is not None else [None] * n
        ks = self._ks(k, n)
        cat_rows, item_rows = [], []
        for i in range(n):
            if (cats[i] is None) == (its[i] is None):
                raise ValueError(f"request {i}: give exactly one of category or item")
            if cats[i] is not None:
                cat_rows.append((i, self.category_id(cats[i])))
            else:
                item_rows.append((i, self.item_id(its[i])))
        self._sync()
        with self._lock:
            st = self.states
            users, _, known = self._population()
            scores = np.zeros((n, len(known)), np.float32)
            user = self._tensor(users)
            if cat_rows:
                head = self.model.interest_head
                ids = torch.as_tensor([c for _, c in cat_rows], device=self.device)
                logits = torch.nn.functional.linear(user, head.weight[ids], head.bias[ids])   # [P, Q]
                scores[[i for i, _ in cat_rows]] = torch.sigmoid(logits).T.float().cpu().numpy()
            if item_rows:
                ids = torch.as_tensor([j for _, j in item_rows], device=self.device)
                win_len = np.minimum(st.n_events[: st.size], self.window)
                logits = self.model.item_logits(user, ids, self._tensor(st.win_item[: st.size], torch.long),
                                                self._tensor(win_len, torch.long))             # [P, Q]
                scores[[i for i, _ in item_rows]] = torch.sigmoid(logits).T.float().cpu().numpy()
            scores[:, ~known] = -np.inf
            idx, vals = _top_k(scores, max(ks))
            idx, vals = idx.tolist(), vals.tolist()
            out = []
            for i in range(n):
                head_key = {"category": str(cats[i])} if cats[i] is not None else {"item": str(its[i])}
                out.append({**head_key, "persons": [{"person": st.keys[r], "probability": v}
                                                    for r, v in zip(idx[i][: ks[i]], vals[i][: ks[i]])
                                                    if v != -np.inf]})
        return out

    # ------------------------------------------------------------------ append
    def append(self, person, events) -> dict:
        """Advance the person's state by the new events only and persist them; returns
        {"person", "appended", "n_events"} once the events are durable."""
        return self.append_batch([person], [events])[0]

    def append_batch(self, persons: Sequence, events: Sequence) -> list[dict]:
        """Batch form of `append` (one durable transaction for the whole batch). A person may appear several
        times; their events are applied in list order. Nothing is applied if any input is invalid."""
        if len(persons) != len(events):
            raise ValueError(f"{len(persons)} persons but {len(events)} event lists")
        keys = [_person_key(p) for p in persons]
        if not keys:
            return []
        if all(type(e) is list and len(e) == 1 for e in events):   # single raw events: one table for the batch
            encoded = self.encoder.encode_table(events)
        else:
            encoded = [self.encode_events(e) for e in events]
            for i, e in enumerate(encoded):
                if not len(e):
                    raise EventError(f"append {i}: no events to append")
        with self._append_lock:
            if self.store is None:
                pending = self._advance(keys, encoded, events)
                pending.number_events(self._local_seq + 1)
                self._local_seq += pending.total
            else:
                # computed from the log as this process applied it, and committed at its end if it still ends there
                pending = self._advance(keys, encoded, events)
                log = pending.log_rows()
                first = self.store.append_events(log, after=self._synced_seq)
                if first is None:   # other processes appended since
                    with self.store.transaction() as db:
                        synced = self._synced_seq
                        self._catch_up()   # their events first, then ours from the states they leave
                        if self._synced_seq != synced:
                            pending = self._advance(keys, encoded, events)
                            log = pending.log_rows()
                        first = self.store.insert_events(db, log)
                pending.number_events(first)
                # committed: durable from here on
            self._publish(pending)
            if self.store is not None and self._unsaved >= self.checkpoint_every:
                try:
                    self._checkpoint()
                except sqlite3.Error as exc:   # the append itself is committed; the next checkpoint retries
                    self._unsaved = 0
                    warnings.warn(f"{self.store.path}: checkpoint failed ({exc}); retried after "
                                  f"{self.checkpoint_every} more events", stacklevel=2)
        return pending.results

    def _checkpoint(self) -> None:
        """Write the states changed since the last checkpoint to the store, with the log position they reflect.
        Call with the append lock held."""
        with self._lock:
            records = [self.states.record(r) for r in sorted(self._dirty)]
            watermark = self._synced_seq
        if records or watermark > 0:
            self.store.checkpoint(records, watermark)
        self._dirty.clear()
        self._unsaved = 0

    def _advance(self, keys: list[str], encoded, raws: Sequence) -> _PendingAppend | _SingleAppend:
        """Compute the new states of the persons in `keys` after their new events (nothing is changed yet).
        encoded: a list of EncodedEvents, or, for one event per person, their table [B, 5] (`raws`: the events
        as sent, [event] per person). Call with the append lock held."""
        if type(encoded) is np.ndarray:   # one event per person: the request path of `append`
            if self._fp is not None:
                index = self.states.index   # only appends change it: no read lock needed under the append lock
                rows = [index.get(key) for key in keys]
                if None not in rows and len(set(rows)) == len(rows):   # known and distinct
                    return self._advance_single(rows, encoded, raws)
            encoded = [EncodedEvents(encoded[i:i + 1], raw=(e[0],)) for i, e in enumerate(raws)]
        with self._lock:
            st = self.states
            canon = [st.keys[r] if (r := st.index.get(key)) is not None else key for key in keys]
        return self._advance_general(canon, encoded)

    def _step_buffers(self, B: int) -> _StepBuffers:
        """New buffers of `_advance_single` for B persons (kept per B, and remade when the engine changes)."""
        if len(self._buffers) >= 64:
            self._buffers.clear()
        buf = self._buffers[B] = _StepBuffers(self.engine, self.engine.num_layers, B, self.engine.hidden_size,
                                              self.window, self.states.user_dim, self.device)
        return buf

    def _advance_single(self, rows: list[int], table: np.ndarray, raws: Sequence) -> _SingleAppend:
        """`_advance` of known, distinct persons (their `rows`) by one event each (`table` [B, 5]): one compiled
        call for the states, windows, counts and category shares (`fastpath.prepare`), one LSTM step, all in
        preallocated buffers; the user vectors get their h part, and the state arrays the results, in
        `_publish` (`fastpath.publish`). Call with the append lock held: nothing else changes the state arrays
        then, so they are read without the read lock."""
        B = len(rows)
        buf = self._buffers.get(B)
        if buf is None or buf.engine is not self.engine:
            buf = self._step_buffers(B)
        buf.rows[:] = rows
        buf.table[...] = table
        st = self.states
        self._fp.prepare(st.h, st.c, st.window, st.n_events, buf.rows, buf.table, self._num_categories,
                         self._history_share, buf.h0, buf.c0, buf.win, buf.n1, buf.user)
        if self.recompute:  # the stateless baseline keeps no LSTM state
            buf.h1[...] = buf.h0
            buf.c1[...] = buf.c0
        else:
            buf.step()
        keys = st.keys
        people = [keys[r] for r in rows]
        results = [{"person": key, "appended": 1, "n_events": n} for key, n in zip(people, buf.n1.tolist())]
        return _SingleAppend(people, [e[0] for e in raws], buf, results)

    def _step(self, table: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One LSTM step from states h0, c0 [L, B, H] (float32, contiguous) by the events table [B, 4+] (ids in
        FIELDS order) -> (h, c) [L, B, H] float32 numpy."""
        dev = self.device
        h, c = torch.from_numpy(h0), torch.from_numpy(c0)
        ids = [torch.from_numpy(table[:, j]) for j in range(4)]   # [B] strided views of the table's columns
        if dev.type != "cpu":
            h, c, ids = h.to(dev), c.to(dev), [t.to(dev) for t in ids]
        h, c = self.engine.step(ids, (h, c))
        if h.device.type != "cpu" or h.dtype != torch.float32:
            h, c = h.float().cpu(), c.float().cpu()
        return h.numpy(), c.numpy()

    def _advance_general(self, canon: list[str], encoded: list[EncodedEvents]) -> _PendingAppend:
        """`_advance` of any batch: persons repeated or new, any number of events each."""
        W = self.window
        L, H = self.engine.num_layers, self.engine.hidden_size
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(canon):
            groups.setdefault(key, []).append(i)
        people = list(groups)
        B = len(people)
        with self._lock:
            st = self.states
            # their current states (zeros for persons seen for the first time)
            rows = np.asarray([st.index.get(key, -1) for key in people], np.int64)
            have = np.flatnonzero(rows >= 0)
            h0 = np.zeros((B, L, H), np.float32)
            c0 = np.zeros((B, L, H), np.float32)
            window = np.zeros((B, 4, W), np.int32)
            n0 = np.zeros(B, np.int64)
            if len(have):
                r = rows[have]
                h0[have], c0[have], window[have], n0[have] = st.h[r], st.c[r], st.window[r], st.n_events[r]
        # the new events as [B, 4, T] ids, then the LSTM over them only (from the stored states)
        new = [[encoded[i] for i in groups[key]] for key in people]
        counts = np.asarray([sum(len(e) for e in evs) for evs in new], np.int64)
        ids = _ids_matrix(new, counts)
        if self.recompute:  # the stateless baseline keeps no LSTM state
            h_np, c_np = h0, c0
        elif ids.shape[2] == 1:
            h, c = self._step(ids[:, :, 0], np.ascontiguousarray(h0.transpose(1, 0, 2)),
                              np.ascontiguousarray(c0.transpose(1, 0, 2)))
            h_np, c_np = h.transpose(1, 0, 2), c.transpose(1, 0, 2)
        else:
            dev = self.device
            state = (torch.from_numpy(np.ascontiguousarray(h0.transpose(1, 0, 2))).to(dev),
                     torch.from_numpy(np.ascontiguousarray(c0.transpose(1, 0, 2))).to(dev))
            h, c = self.engine.run([torch.from_numpy(ids[:, j]).to(dev) for j in range(4)],
                                   torch.from_numpy(counts), state)
            h_np, c_np = h.transpose(0, 1).float().cpu().numpy(), c.transpose(0, 1).float().cpu().numpy()
        # slide the windows (the last W events, left-aligned) and derive the new user vectors
        n1 = n0 + counts
        for b in range(B):
            valid, k = int(min(n0[b], W)), int(counts[b])
            if valid + k <= W:
                window[b, :, valid:valid + k] = ids[b, :, :k]
            else:
                window[b] = np.concatenate([window[b, :, :valid], ids[b, :, :k]], axis=1)[:, -W:]
        user = self._user_vectors(h_np[:, -1], window[:, CATEGORY], n1)
        # one answer per request: the person's event count after that request's events
        seen = {key: int(n0[b]) for b, key in enumerate(people)}
        results = []
        for i, key in enumerate(canon):
            seen[key] += len(encoded[i])
            results.append({"person": key, "appended": len(encoded[i]), "n_events": seen[key]})
        return _PendingAppend(people, new, counts, h_np, c_np, window, n1, user, results)

    def _publish(self, p: _PendingAppend | _SingleAppend) -> None:
        """Make computed (and, with a store, committed) states visible to readers."""
        with self._lock:
            st = self.states
            if type(p) is _SingleAppend:
                b = p.buf
                self._fp.publish(st.h, st.c, st.window, st.n_events, st.last_seq, st.user, st._unit_stale, b.rows,
                                 b.h1, b.c1, b.win, b.n1, p.first, b.user)
                rows, last = b.rows, p.first + p.total - 1
            else:
                rows = self._publish_general(p)
                last = int(p.last_seq.max(initial=0))
            if self.store is not None:
                self._synced_seq = max(self._synced_seq, last)
                self._dirty.update(rows.tolist())
                self._unsaved += p.total

    def _publish_general(self, p: _PendingAppend) -> np.ndarray:
        """`_publish` of any pending append (call with the lock held); returns the persons' rows."""
        rows = np.asarray([self.states.add(key) for key in p.people], np.int64)
        # a state of the same person that already holds these events (or later ones) stays
        newer = p.last_seq > self.states.last_seq[rows]
        if newer.all():   # the usual case
            self.states.set_rows(rows, p.h, p.c, p.window, p.n_events, p.last_seq, p.user)
        elif newer.any():
            self.states.set_rows(rows[newer], p.h[newer], p.c[newer], p.window[newer], p.n_events[newer],
                                 p.last_seq[newer], p.user[newer])
        return rows

    # ------------------------------------------------------------------ numpy access
    def user_vectors(self, persons) -> tuple[np.ndarray, np.ndarray]:
        """([n, U] user vectors, [n] bool known) of persons (zeros where unknown)."""
        subj = self._subjects(list(persons), None)
        return subj.user, subj.known

    def person_state(self, person) -> dict | None:
        """A copy of a person's state: {"person", "h" [L, H], "c" [L, H], "window" {field: ids}, "n_events",
        "last_seq"} (numpy arrays, the window's valid events only), or None when the person is unknown."""
        self._sync()
        with self._lock:
            r = self.states.row(_person_key(person))
            if r is None:
                return None
            rec = self.states.record(r)
        valid = min(rec.n_events, self.window)
        return {"person": rec.person, "h": rec.h, "c": rec.c, "n_events": rec.n_events, "last_seq": rec.last_seq,
                "window": {f: rec.window[j, :valid].astype(np.int64) for j, f in enumerate(FIELDS)}}

    def appended_events(self, person) -> list[dict]:
        """The events appended for a person, oldest first, as stored in the durable log (raw dicts)."""
        if self.store is None:
            raise RuntimeError("this session keeps no log (state=':memory:')")
        with self._lock:
            key = _person_key(person)
            r = self.states.row(key)
            key = self.states.keys[r] if r is not None else key
        return self.store.events_of(key)

    @property
    def n_persons(self) -> int:
        with self._lock:
            return len(self.states.known_rows())

    def info(self) -> dict:
        return {"run": str(self.run_dir), "layers": self.layers, "device": str(self.device), "window": self.window,
                "persons": self.n_persons, "durable": self.store is not None, "recompute": self.recompute,
                "state": str(self.store.path) if self.store is not None else MEMORY}

    def close(self) -> None:
        """Checkpoint the states changed since the last checkpoint (so that a restart need not replay them), then
        close the store. The appended events are durable whether or not this runs."""
        if self.store is not None:
            with self._append_lock:
                try:
                    if self._dirty:
                        self._checkpoint()
                except sqlite3.Error as exc:   # the log holds every event: a restart replays them
                    warnings.warn(f"{self.store.path}: no checkpoint at close ({exc}); the next start replays the "
                                  "events after the last one", stacklevel=2)
                self.store.close()
                self.store = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
