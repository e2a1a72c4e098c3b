"""`fastinterest serve RUN --host 127.0.0.1 --port 8000 [--workers N]`: the HTTP service on uvicorn."""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["handler", "register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a trained run over HTTP (interests, recommend, similar, target, append)",
        description="Serve a run directory over HTTP with per-person LSTM state, micro-batching, durable "
                    "appends (an event log file + SQLite state checkpoints), /healthz and /metrics. See fastinterest.serve.app for the API.")
    p.add_argument("run", help="run directory (fastinterest train --out RUN)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (each loads the model; they share the state file)")
    p.add_argument("--layers", default="fastinterest", choices=["fastinterest", "torch"],
                   help="fused fastinterest kernels, or stock torch.nn layers (same answers)")
    p.add_argument("--backend", default=None, help="force a fastinterest LSTM backend (ext, numba, triton, reference)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--state", default=None,
                   help="state file (default RUN/serving/state.sqlite3, its event log beside it in STATE.log; "
                        "':memory:' = not durable)")
    p.add_argument("--prepared", default=None,
                   help="prepared data dir whose persons are known at start (default: the run's; 'none': nobody)")
    p.add_argument("--synchronous", default="normal", choices=["normal", "full"],
                   help="normal: appends survive a killed process; full: also a power cut (fsync per batch)")
    p.add_argument("--max-batch", type=int, default=64, help="requests per batch")
    p.add_argument("--max-wait-ms", type=float, default=1.0, help="how long a partial batch waits for more")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests per endpoint before 429")
    p.add_argument("--queue-timeout", type=float, default=5.0, help="seconds in the queue before 503")
    p.add_argument("--max-events", type=int, default=1000, help="events per request (more: 413)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--recompute", action="store_true",
                   help="keep no LSTM state: rerun the model over each person's window on every read "
                        "(the stateless baseline of benchmarks/bench_serve.py)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests after SIGTERM")
    p.set_defaults(func=handler)


def config_from_args(args):
    """The ServeConfig of the parsed arguments (starlette and uvicorn are imported only to serve, so the rest of
    the `fastinterest` command line works without the `serve` extra)."""
    from .app import ServeConfig

    return ServeConfig(run=args.run, layers=args.layers, backend=args.backend, device=args.device, state=args.state,
                       prepared=args.prepared, synchronous=args.synchronous, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, queue_timeout_s=args.queue_timeout,
                       max_events=args.max_events, threads=args.threads, recompute=args.recompute)


def handler(args) -> int:
    try:
        import uvicorn

        from .app import CONFIG_ENV
    except ImportError as exc:
        print(f"fastinterest serve needs the serve extra ({exc}): pip install 'fastinterest[serve]'", file=sys.stderr)
        return 2
    config = config_from_args(args)
    if args.workers < 1:
        print("fastinterest serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and config.state == ":memory:":
        print("fastinterest serve: --workers > 1 needs a state file (workers share appended states through it)",
              file=sys.stderr)
        return 2
    common = {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
              "proxy_headers": False, "timeout_graceful_shutdown": args.graceful_timeout, "lifespan": "on"}
    if args.workers == 1:
        from .app import create_app

        uvicorn.run(create_app(config), **common)
    else:
        if config.threads is None:
            config.threads = max(1, (os.cpu_count() or 1) // args.workers)
        os.environ[CONFIG_ENV] = config.to_env()
        uvicorn.run("fastinterest.serve.app:app_from_env", factory=True, workers=args.workers, **common)
    return 0


if __name__ == "__main__":  # python -m fastinterest.serve.cli RUN ...
    parser = argparse.ArgumentParser(prog="fastinterest-serve")
    register(parser.add_subparsers())
    ns = parser.parse_args(["serve", *sys.argv[1:]])
    sys.exit(ns.func(ns))
