"""The HTTP service: a Starlette (ASGI) app over a `Session`, run by uvicorn (`fastinterest serve RUN`).

Endpoints (JSON in, JSON out):

    POST /interests  {"person": P | "events": [...], "k": 10}                   top-k categories
    POST /recommend  {"person": P | "events": [...], "k": 10, "exclude_seen": true}  top-k items
    POST /similar    {"person": P | "events": [...], "k": 10}                   most similar known persons
    POST /target     {"category": C | "item": I, "k": 100}                       who should see this ad
    POST /append     {"person": P, "events": [...]}                              absorb new events (durable)
    GET  /healthz    200 {"status": "ok", ...} when serving, 503 while shutting down
    GET  /metrics    Prometheus text: requests, latencies, batch sizes, queue depths, rejections

P is a person key (string, or an integer prepared id); events are raw-schema dicts (see
`fastinterest.serve.events`). Answers are those of `Session` (unknown persons: popularity, "source":
"popularity"). Errors are {"error": message} with 400 (malformed JSON), 413 (body or event list too
large), 422 (wrong fields or types, bad events, unknown category/item), 429 (queue full, retry later),
503 (shutting down or waited too long), 500 (a bug: the message says what failed).

Concurrent requests of one kind are micro-batched (`fastinterest.serve.batching`): one Session batch
call answers up to `max_batch` of them. Appends are acknowledged after their batch's transaction has
committed. On shutdown (SIGTERM/SIGINT to uvicorn) the server stops accepting connections, answers
everything in flight and queued, then closes the state store.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batching import MicroBatcher, Overloaded, Unavailable
from .events import EventError

__all__ = ["CONFIG_ENV", "ServeConfig", "app_from_env", "create_app"]

CONFIG_ENV = "FASTINTEREST_SERVE_CONFIG"
METHODS = ("interests", "recommend", "similar", "target", "append")


@dataclass
class ServeConfig:
    """Everything `fastinterest serve` passes to each worker process (JSON-able)."""

    run: str
    layers: str = "fastinterest"
    backend: str | None = None
    device: str = "cpu"
    state: str | None = None           # state file (+ STATE.log); ":memory:" = not durable; None = RUN/serving/state.sqlite3
    prepared: str | None = None        # prepared data dir; None = the run's; "none" = no known persons at load
    synchronous: str = "normal"
    max_batch: int = 64                # requests per Session batch call
    max_wait_ms: float = 1.0           # how long a batch that is not full waits for more
    max_queue: int = 1024              # waiting requests per method before 429
    queue_timeout_s: float = 5.0       # a request still queued after this is answered 503
    max_events: int = 1000             # events per request (more: 413)
    max_k: int = 1000
    max_body_bytes: int = 4 << 20
    threads: int | None = None         # torch intra-op threads (None: torch's default)
    recompute: bool = False            # no sequence state: rerun the LSTM over each window (a baseline)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise RuntimeError(f"${CONFIG_ENV} is not set (it is set by `fastinterest serve`)")
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------- errors and validation
class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise RequestError(422, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _person(value) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(422, f"person must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, str) and not 0 < len(value) <= 256:
        raise RequestError(422, "person must be a non-empty string of at most 256 characters")
    return value


class Validator:
    """Turns a parsed JSON body into the arguments of one Session batch row (or raises RequestError)."""

    def __init__(self, session, config: ServeConfig):
        self.session, self.config = session, config

    def _events(self, value, *, allow_empty: bool):
        if not isinstance(value, list):
            raise RequestError(422, f"events must be a list of event objects, got {type(value).__name__}")
        if len(value) > self.config.max_events:
            raise RequestError(413, f"too many events: {len(value)} (at most {self.config.max_events} per request)")
        if not value and not allow_empty:
            raise RequestError(422, "events must not be empty")
        try:
            return self.session.encode_events(value)
        except EventError as exc:
            raise RequestError(422, str(exc)) from None

    def subject(self, body: dict, extra: tuple[str, ...] = ()) -> dict:
        _check_fields(body, ("person", "events", "k", *extra))
        has_person, has_events = body.get("person") is not None, body.get("events") is not None
        if has_person == has_events:
            raise RequestError(422, "give exactly one of person or events")
        return {"person": _person(body["person"]) if has_person else None,
                "events": self._events(body["events"], allow_empty=True) if has_events else None,
                "k": _int(body, "k", 10, 1, self.config.max_k)}

    def interests(self, body: dict) -> dict:
        return self.subject(body)

    def similar(self, body: dict) -> dict:
        return self.subject(body)

    def recommend(self, body: dict) -> dict:
        args = self.subject(body, ("exclude_seen",))
        exclude = body.get("exclude_seen", True)
        if not isinstance(exclude, bool):
            raise RequestError(422, f"exclude_seen must be true or false, got {type(exclude).__name__}")
        args["exclude_seen"] = exclude
        return args

    def target(self, body: dict) -> dict:
        _check_fields(body, ("category", "item", "k"))
        has_cat, has_item = body.get("category") is not None, body.get("item") is not None
        if has_cat == has_item:
            raise RequestError(422, "give exactly one of category or item")
        name = "category" if has_cat else "item"
        value = body[name]
        if not isinstance(value, str):
            raise RequestError(422, f"{name} must be a string, got {type(value).__name__}")
        try:
            (self.session.category_id if has_cat else self.session.item_id)(value)
        except KeyError as exc:
            raise RequestError(422, exc.args[0]) from None
        return {"category": value if has_cat else None, "item": None if has_cat else value,
                "k": _int(body, "k", 100, 1, self.config.max_k)}

    def append(self, body: dict) -> dict:
        _check_fields(body, ("person", "events"))
        if body.get("person") is None or body.get("events") is None:
            raise RequestError(422, "append needs person and events")
        return {"person": _person(body["person"]), "events": self._events(body["events"], allow_empty=False)}


def batch_functions(session) -> dict[str, Callable[[list[dict]], list]]:
    """Per method: rows of validated arguments -> one Session batch call -> one answer per row."""
    def col(rows, name):
        return [r[name] for r in rows]

    return {
        "interests": lambda rows: session.interests_batch(col(rows, "person"), events=col(rows, "events"),
                                                          k=col(rows, "k")),
        "recommend": lambda rows: session.recommend_batch(col(rows, "person"), events=col(rows, "events"),
                                                          k=col(rows, "k"), exclude_seen=col(rows, "exclude_seen")),
        "similar": lambda rows: session.similar_batch(col(rows, "person"), events=col(rows, "events"),
                                                      k=col(rows, "k")),
        "target": lambda rows: session.target_batch(col(rows, "category"), items=col(rows, "item"), k=col(rows, "k")),
        "append": lambda rows: session.append_batch(col(rows, "person"), col(rows, "events")),
    }


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of this app (several apps can live in one process)."""

    LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastinterest_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("fastinterest_request_seconds", "Request latency (receipt to answer)", ["endpoint"],
                                 buckets=self.LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("fastinterest_batch_size", "Requests answered by one Session batch call",
                                    ["method"], buckets=self.BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("fastinterest_batch_seconds", "Time of one Session batch call", ["method"],
                                       buckets=self.LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("fastinterest_rejected", "Requests refused by back-pressure", ["method", "reason"],
                                registry=r)
        self.queue_depth = Gauge("fastinterest_queue_depth", "Requests waiting for a batch", ["method"], registry=r)
        self.persons = Gauge("fastinterest_persons", "Persons with at least one event", registry=r)
        self.appended = Counter("fastinterest_appended_events", "Events appended (acknowledged)", registry=r)

        # label lookups cost more than the updates: keep the children of the hot paths
        self._latency = {m: self.latency.labels(m) for m in METHODS}
        self._batch = {m: (self.batch_size.labels(m), self.batch_seconds.labels(m)) for m in METHODS}
        self._requests: dict[tuple[str, int], Any] = {}

    def request_done(self, method: str, status: int, seconds: float) -> None:
        child = self._requests.get((method, status))
        if child is None:
            child = self._requests[(method, status)] = self.requests.labels(method, str(status))
        child.inc()
        self._latency[method].observe(seconds)

    def on_batch(self, method: str, size: int, seconds: float) -> None:
        size_hist, seconds_hist = self._batch[method]
        size_hist.observe(size)
        seconds_hist.observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------- the app
try:  # orjson parses and writes JSON several times faster than the standard library; optional
    import orjson

    _loads, _JSONError = orjson.loads, orjson.JSONDecodeError

    def _dumps(payload: Any) -> bytes:
        return orjson.dumps(payload)
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    _loads, _JSONError = json.loads, (json.JSONDecodeError, UnicodeDecodeError)

    def _dumps(payload: Any) -> bytes:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _json(payload: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(payload), status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past `limit` (also without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServeConfig | None = None, *, session=None) -> Starlette:
    """The ASGI app. With `session` given it is used (and not closed at shutdown); otherwise the Session is
    loaded from `config` at startup (in a thread) and closed at shutdown."""
    if config is None and session is None:
        raise ValueError("give a ServeConfig or a Session")
    config = config or ServeConfig(run=str(session.run_dir))
    metrics = Metrics()
    ctx: dict[str, Any] = {"session": session, "batchers": {}, "status": "starting"}

    def open_session():
        import torch

        from .session import Session

        if config.threads:
            torch.set_num_threads(config.threads)
        prepared = False if config.prepared == "none" else config.prepared
        return Session(config.run, device=config.device, backend=config.backend, layers=config.layers,
                       state=config.state, prepared=prepared, synchronous=config.synchronous,
                       recompute=config.recompute)

    @asynccontextmanager
    async def lifespan(app):
        own = ctx["session"] is None
        if own:
            ctx["session"] = await asyncio.to_thread(open_session)
        sess = ctx["session"]
        ctx["validator"] = Validator(sess, config)
        for name, fn in batch_functions(sess).items():
            b = MicroBatcher(name, fn, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000.0,
                             max_queue=config.max_queue, queue_timeout=config.queue_timeout_s, on_batch=metrics.on_batch)
            b.start()
            ctx["batchers"][name] = b
        ctx["status"] = "ok"
        try:
            yield
        finally:
            ctx["status"] = "draining"
            await asyncio.gather(*(b.close() for b in ctx["batchers"].values()))
            if own:
                await asyncio.to_thread(sess.close)
            ctx["status"] = "stopped"

    def endpoint(method: str):
        async def handle(request: Request) -> Response:
            t0 = time.perf_counter()
            status = 500
            try:
                response = await _answer(request, method)
                status = response.status_code
                return response
            finally:
                metrics.request_done(method, status, time.perf_counter() - t0)

        return handle

    async def _answer(request: Request, method: str) -> Response:
        try:
            if ctx["status"] != "ok":
                raise Unavailable(f"the service is {ctx['status']}")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                raise RequestError(413, f"request body over {config.max_body_bytes} bytes")
            raw = await _read_body(request, config.max_body_bytes)
            try:
                body = _loads(raw)
            except _JSONError as exc:
                raise RequestError(400, f"malformed JSON: {exc}") from None
            if not isinstance(body, dict):
                raise RequestError(422, f"the request body must be a JSON object, got {type(body).__name__}")
            args = getattr(ctx["validator"], method)(body)
            result = await ctx["batchers"][method].submit(args)
            if method == "append":
                metrics.appended.inc(result["appended"])
            return _json(result)
        except RequestError as exc:
            return _json({"error": exc.message}, exc.status)
        except Overloaded as exc:
            metrics.rejected.labels(method, "queue_full").inc()
            return _json({"error": f"overloaded: {exc}; retry later"}, 429, {"Retry-After": "1"})
        except Unavailable as exc:
            metrics.rejected.labels(method, "unavailable").inc()
            return _json({"error": f"unavailable: {exc}"}, 503, {"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - answer with the failure instead of a bare 500
            return _json({"error": f"internal error in {method}: {type(exc).__name__}: {exc}"}, 500)

    async def healthz(request: Request) -> Response:
        sess = ctx["session"]
        if ctx["status"] != "ok" or sess is None:
            return _json({"status": ctx["status"]}, 503)
        return _json({"status": "ok", "pid": os.getpid(), **sess.info()})

    async def metrics_endpoint(request: Request) -> Response:
        sess = ctx["session"]
        if sess is not None:
            metrics.persons.set(sess.n_persons)
        for name, b in ctx["batchers"].items():
            metrics.queue_depth.labels(name).set(b.depth)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [Route(f"/{m}", endpoint(m), methods=["POST"]) for m in METHODS]
    routes += [Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics_endpoint, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for `--workers N`: every worker process builds its app from $FASTINTEREST_SERVE_CONFIG."""
    return create_app(ServeConfig.from_env())
