"""Load test of the HTTP service (issue 6): our layers and per-person state against the same service on
stock torch layers.

    python benchmarks/bench_serve.py                      # ~3 minutes on 2 cores
    python benchmarks/bench_serve.py --duration 10        # shorter
    python benchmarks/bench_serve.py --run runs/demo/run  # a trained run of your own

What runs
---------
A run directory (default: built once under runs/bench-serve/ from 40k synthetic events, the default model
size embedding_dim=64, hidden_size=128, window 100, weights untrained: timing does not depend on them).
The script starts `fastinterest serve RUN` on 127.0.0.1 once per service variant — same code, same
micro-batching settings (max_batch, max_wait), `--workers` processes (1), `--server-threads` torch threads (1):

* `torch`: stock torch.nn.Embedding + torch.nn.LSTM layers, and, as stock layers keep no per-person
  sequence state, `--recompute`: every answer for a person reruns the LSTM over their history window;
* `fastinterest`: the fused EmbeddingLSTM kernels and the per-person LSTM state (`append` = `step`);
* `torch+state` (with `--variants ... torch+state`): stock layers on our state store, to separate what the
  kernels and what the state contribute.

Each variant gets 256 persons with 50-event histories (sent through /append first), then concurrent
keep-alive clients (`--clients`, 32) for a bounded time per scenario:

* interests_known: POST /interests for those persons — the headline (`--duration`, 30 s);
* interests_inline50: POST /interests with a 50-event history in the body (both variants run the LSTM on
  every request: a pure layer comparison);
* append_then_interests: per client, POST /append of one event for its own person, then /interests.

Then, in process (no HTTP): append one event + interests with our Session, against the stateless
stock-torch Session (the append only records the event; interests recompute the 51-event history),
for one person per call and for 32, with the appends kept in memory and with both sessions writing them
to a durable state store (event log file + SQLite checkpoint, as the service; `--inproc-state`). `--inproc-only` runs just this part (about two minutes).

Results (requests/s, p50/p95/p99 latency, errors, ratios from the same run) go to
benchmarks/results/<device_tag()>/serve.{md,json} and are printed. The load generator is a small asyncio
HTTP/1.1 client on raw sockets in its own process, so that on a 2-core machine the client costs far
less CPU than the server it measures; every variant is measured with the same client.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))

from harness import RESULTS, device_tag, setup_threads

T0 = 1_704_164_136


# ---------------------------------------------------------------------------- the run
def build_run(root: Path, n_events: int = 40_000, seed: int = 0) -> Path:
    """A run dir with untrained weights of the default model size, on prepared synthetic data (cached)."""
    import warnings

    from fastinterest.data import generate_synthetic, prepare
    from fastinterest.metrics.report import write_json_atomic
    from fastinterest.train import TrainConfig, Trainer
    from fastinterest.train import checkpoint as ckpt
    from fastinterest.train.data import read_vocab
    from fastinterest.train.trainer import vocab_sizes

    run = root / "run"
    if (run / "model.safetensors").exists():
        return run
    root.mkdir(parents=True, exist_ok=True)
    generate_synthetic(n_events, root / "events.csv", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(root / "events.csv", root / "prepared", progress=False)
    vocab = read_vocab(root / "prepared")
    cfg = TrainConfig(layers="torch", embedding_dim=64, hidden_size=128, seed=seed)
    model = Trainer(cfg, progress=False).build_model(vocab_sizes(vocab, {}))
    run.mkdir(parents=True, exist_ok=True)
    ckpt.write_config(run, {"model": model.config, "train": {"note": "untrained weights, for timing only"},
                            "data": {"prepared": str((root / "prepared").resolve()), "max_len": 100},
                            "layers_used": "torch", "best": None})
    write_json_atomic(run / "vocab.json", vocab)
    ckpt.save_best(run, model, 0, "none", 0.0)
    return run


def history(vocab: dict, n: int, seed: int) -> list[dict]:
    """n raw events with items/categories drawn by training popularity."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(field, size):
        counts = np.asarray(vocab[field]["counts"], float)
        counts[:2] = 0
        return [vocab[field]["tokens"][i] for i in rng.choice(len(counts), size, p=counts / counts.sum())]

    items, cats = draw("item", n), draw("category", n)
    acts, plats = draw("action", n), draw("platform", n)
    return [{"platform": p, "action": a, "item_id": i, "category": c, "timestamp": T0 + 60 * k}
            for k, (i, c, a, p) in enumerate(zip(items, cats, acts, plats))]


# ---------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VARIANTS = {  # name -> extra `fastinterest serve` arguments
    "torch": ["--layers", "torch", "--recompute"],
    "fastinterest": ["--layers", "fastinterest"],
    "torch+state": ["--layers", "torch"],
    "fastinterest-recompute": ["--layers", "fastinterest", "--recompute"],
}


def start_server(run: Path, variant: str, port: int, state: str, args, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastinterest", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           *VARIANTS[variant], "--state", state, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--threads", str(args.server_threads), "--workers", str(args.workers)]
    with open(log_path, "w") as log:  # the server keeps its own copy of the file descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------- the load generator
def _request(path: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _exchange(reader, writer, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _client(port: int, scripts: list[list[bytes]], deadline: float, warm_until: float, lat: list, errs: list):
    """One keep-alive connection; each round sends the requests of one script in order (one latency each
    round: e.g. append + interests)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            script = scripts[i % len(scripts)]
            i += 1
            t0 = time.perf_counter()
            ok = True
            for req in script:
                try:
                    ok = (await _exchange(reader, writer, req)) == 200 and ok
                except (ConnectionError, asyncio.IncompleteReadError):
                    errs.append(1)
                    return
            if t0 >= warm_until:
                (lat if ok else errs).append(time.perf_counter() - t0)
    finally:
        writer.close()


def _load_process(port: int, per_client: list[list[list[bytes]]], duration: float, warmup: float, queue):
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main():
        lat, errs = [], []
        start = time.perf_counter()
        warm_until, deadline = start + warmup, start + warmup + duration
        await asyncio.gather(*(_client(port, scripts, deadline, warm_until, lat, errs) for scripts in per_client))
        measured = time.perf_counter() - warm_until
        return lat, len(errs), measured

    lat, errors, measured = asyncio.run(main())
    queue.put((lat, errors, measured))


def drive(port: int, per_client, duration: float, warmup: float) -> tuple[list[float], int, float]:
    """Run the clients in a separate process: (latencies in seconds, errors, measured seconds)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_load_process, args=(port, per_client, duration, warmup, q))
    p.start()
    lat, errors, measured = q.get()
    p.join()
    return lat, errors, measured


def summarize(runs: list[tuple[list[float], int, float]], clients: int) -> dict:
    """Requests/s and latency percentiles (ms) over the rounds of one (scenario, variant)."""
    lat = sorted(x for r in runs for x in r[0])
    errors, measured = sum(r[1] for r in runs), sum(r[2] for r in runs)

    def pct(x):
        return 1e3 * lat[min(len(lat) - 1, int(x * len(lat)))] if lat else float("nan")

    return {"rps": len(lat) / measured, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "requests": len(lat), "errors": errors, "clients": clients, "seconds": round(measured, 1),
            "rounds": len(runs)}


# ---------------------------------------------------------------------------- setup over HTTP
def seed_histories(port: int, persons: list[str], vocab: dict, n: int = 50) -> None:
    """Give each person an n-event history through POST /append (so every variant starts the same)."""
    import urllib.request

    for i, person in enumerate(persons):
        body = json.dumps({"person": person, "events": history(vocab, n, seed=7000 + i)}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/append", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["n_events"] == n


# ---------------------------------------------------------------------------- in-process: append vs recompute
def append_vs_recompute(run: Path, vocab: dict, repeats: int, durable: bool = False, block: int = 1) -> list[dict]:
    """append(1 event) + interests: our Session (LSTM state, fused step) against the stateless stock-torch
    Session (records the event, recomputes the person's 51-event history for interests). durable=True: both
    sessions keep their appends in a state store (every append is written to the event log file before it
    returns; states checkpointed to SQLite behind it), else in memory only.

    block: how many consecutive calls each session makes before the other takes its turn. 1 alternates call
    by call (each call then finds the other session's model and data in the caches: the cold case); with a
    block of 10 each session mostly finds its own working set warm, as a server process answering a stream
    of requests does. Both orders keep the two sessions under the same machine conditions."""
    import numpy as np
    from fastinterest.serve import Session

    states = {"fastinterest": ":memory:", "torch": ":memory:"}
    if durable:
        tmp = ROOT / "runs" / "bench-serve" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        states = {name: tmp / f"inproc-{name}.sqlite3" for name in states}
        for path in states.values():
            for suffix in ("", "-wal", "-shm", ".log"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    ours = Session(run, state=states["fastinterest"], layers="fastinterest", prepared=False)
    stock = Session(run, state=states["torch"], layers="torch", prepared=False, recompute=True)
    rows = []
    for B in (1, 32):
        # every call gets persons with exactly 50 events so far (fresh ones each repeat), so that the
        # stateless baseline always recomputes 51 events
        persons = [[f"bench-{B}-{r}-{i}" for i in range(B)] for r in range(repeats)]
        flat = [p for group in persons for p in group]
        hist = [history(vocab, 50, seed=100 + i % 64) for i in range(len(flat))]
        for lo in range(0, len(flat), 512):
            for s in (ours, stock):
                s.append_batch(flat[lo:lo + 512], hist[lo:lo + 512])
        del hist
        gc.collect()  # the seeding garbage would otherwise be traversed by collections during the timing
        news = [[[dict(history(vocab, 1, seed=10_000 + r * B + i)[0], timestamp=T0 + 60 * 50)] for i in range(B)]
                for r in range(repeats)]   # the requests, built before the timing: [event] per person
        timings = {"fastinterest": [], "torch": []}
        cpu = {"fastinterest": [], "torch": []}   # CPU time of the calling process: what load from elsewhere on a
                                                   # shared machine inflates far less than the wall clock
        for r0 in range(0, repeats, block):
            answers: dict = {"fastinterest": {}, "torch": {}}
            for name, s in (("fastinterest", ours), ("torch", stock)):   # interleaved: same machine conditions
                for r in range(r0, min(r0 + block, repeats)):
                    c0, t0 = time.process_time(), time.perf_counter()
                    s.append_batch(persons[r], news[r])
                    answers[name][r] = s.interests_batch(persons[r], k=10)
                    timings[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            for r in answers["fastinterest"]:   # the same answers
                for a, b in zip(answers["fastinterest"][r], answers["torch"][r]):
                    assert [x["category"] for x in a["interests"]] == [x["category"] for x in b["interests"]]
                    assert np.allclose([x["probability"] for x in a["interests"]],
                                       [x["probability"] for x in b["interests"]], atol=1e-4)
        for name, label in (("fastinterest", "fastinterest: append(1) = step, interests from the state"),
                            ("torch", "torch: append(1) recorded, interests recompute 51 events")):
            t = sorted(timings[name])
            rows.append({"persons": B, "variant": name, "method": label, "state": "durable" if durable else "memory",
                         "order": "alternating calls" if block == 1 else f"blocks of {block}",
                         "median_ms": 1e3 * statistics.median(t),
                         "min_ms": 1e3 * t[0], "p95_ms": 1e3 * t[int(0.95 * (len(t) - 1))], "calls": len(t),
                         "cpu_median_ms": 1e3 * statistics.median(cpu[name])})
    ours.close(), stock.close()
    return rows


def inproc_rows(run: Path, vocab: dict, args) -> list[dict]:
    rows = []
    for durable in {"memory": [False], "durable": [True], "both": [False, True]}[args.inproc_state]:
        for block in sorted({1, args.inproc_block}):
            rows += append_vs_recompute(run, vocab, args.repeats, durable, block)
    return rows


def print_inproc(rows: list[dict]) -> None:
    stock = {(r["state"], r["persons"], r["order"]): r for r in rows if r["variant"] == "torch"}
    for r in rows:
        base = stock[r["state"], r["persons"], r["order"]]
        print(f"in-process [{r['state']}, {r['order']}] {r['method']:<58} persons={r['persons']:<3} median {r['median_ms']:.3f} ms  "
              f"min {r['min_ms']:.3f} ms  p95 {r['p95_ms']:.3f} ms  cpu median {r['cpu_median_ms']:.3f} ms  x torch: "
              f"median {base['median_ms'] / r['median_ms']:.1f}  min {base['min_ms'] / r['min_ms']:.1f}  "
              f"cpu median {base['cpu_median_ms'] / r['cpu_median_ms']:.1f}", flush=True)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="run dir (default: build runs/bench-serve/run)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the headline scenario")
    ap.add_argument("--short", type=float, default=8.0, help="seconds of each other scenario")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each measured round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario (time is split)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--persons", type=int, default=256, help="persons with 50-event histories")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=1.0)
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads per server worker")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--variants", nargs="+", default=["torch", "fastinterest"], choices=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=100, help="in-process append-vs-recompute repeats")
    ap.add_argument("--inproc-block", type=int, default=10, choices=range(1, 1001), metavar="N",
                    help="in-process: also time the sessions in alternating blocks of this many calls")
    ap.add_argument("--inproc-only", action="store_true",
                    help="only the in-process append-vs-recompute part (no HTTP servers); prints, writes nothing")
    ap.add_argument("--inproc-state", choices=["memory", "durable", "both"], default="both",
                    help="where the in-process sessions keep appends: in memory, in a durable state store (event "
                         "log file + SQLite checkpoint, as the service), or both (default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    setup_threads(1)
    args.load_before = os.getloadavg()[0]

    run = args.run or build_run(ROOT / "runs" / "bench-serve")
    vocab = json.loads((run / "vocab.json").read_text())
    if args.inproc_only:
        print_inproc(inproc_rows(run, vocab, args))
        return 0
    C = args.clients
    persons = [f"h50-{i}" for i in range(args.persons)]
    scenarios = {
        "interests_known": ([[[_request("/interests", {"person": persons[(c * 16 + j) % len(persons)], "k": 10})]
                              for j in range(16)] for c in range(C)], args.duration),
        "interests_inline50": ([[[_request("/interests", {"events": history(vocab, 50, seed=1000 * c + j), "k": 10})]
                                 for j in range(8)] for c in range(C)], args.short),
        "append_then_interests": ([[[_request("/append", {"person": persons[c % len(persons)],
                                                          "events": [dict(e, timestamp=T0 + 86_400 + 60 * j)]}),
                                     _request("/interests", {"person": persons[c % len(persons)], "k": 10})]
                                    for j, e in enumerate(history(vocab, 64, seed=50 + c))] for c in range(C)],
                                  args.short),
    }
    # every variant's server runs at once (an idle one costs no CPU); each scenario is measured in rounds
    # that alternate the variants, so that load from elsewhere on the machine hits them alike
    tmp = ROOT / "runs" / "bench-serve" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for variant in args.variants:
            port = free_port()
            state = tmp / f"state-{variant}.sqlite3"
            for suffix in ("", "-wal", "-shm", ".log"):
                Path(str(state) + suffix).unlink(missing_ok=True)
            servers[variant] = (start_server(run, variant, port, str(state), args, tmp / f"server-{variant}.log"), port)
            seed_histories(port, persons, vocab)
        results = []
        for name, (per_client, seconds) in scenarios.items():
            runs = {v: [] for v in args.variants}
            for r in range(args.rounds):
                order = args.variants if r % 2 == 0 else args.variants[::-1]
                for variant in order:
                    runs[variant].append(drive(servers[variant][1], per_client, seconds / args.rounds, args.warmup))
            for variant in args.variants:
                res = {**summarize(runs[variant], C), "variant": variant, "scenario": name}
                results.append(res)
                print(f"{name:<24} {variant:<13} {res['rps']:9.1f} req/s  p50 {res['p50_ms']:6.2f}  "
                      f"p95 {res['p95_ms']:6.2f}  p99 {res['p99_ms']:6.2f} ms  errors {res['errors']}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    inproc = inproc_rows(run, vocab, args)
    print_inproc(inproc)
    args.load_after = os.getloadavg()[0]
    write(results, inproc, args, run)
    return 0


def write(results: list[dict], inproc: list[dict], args, run: Path) -> None:
    import torch

    out = args.out or RESULTS / device_tag()
    out.mkdir(parents=True, exist_ok=True)
    by = {(r["scenario"], r["variant"]): r for r in results}
    cmd = ("python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])).strip()
    machine = (f"machine: `{device_tag()}` ({os.cpu_count()} CPUs shared by server, client and whatever else ran: "
               f"1-min load average {args.load_before:.1f} before, {args.load_after:.1f} after), "
               f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; server: {args.workers} worker "
               f"process(es), {args.server_threads} torch thread(s), max_batch {args.max_batch}, max_wait "
               f"{args.max_wait_ms} ms; {args.persons} persons with 50-event histories; run `{run}`")
    lines = [f"# serve: HTTP load test of `fastinterest serve`, {args.clients} concurrent clients on loopback", "",
             machine, "",
             f"reproduce: `{cmd}`", "",
             ("variants: `torch` = stock torch.nn layers, no per-person state (every read reruns the LSTM over the "
              "person's history); `fastinterest` = fused kernels + per-person LSTM state; `torch+state` = stock "
              "layers on our state store."), "",
             "| scenario | variant | requests/s | p50 ms | p95 ms | p99 ms | errors | x torch (req/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = by.get((r["scenario"], "torch"))
        ratio = r["rps"] / base["rps"] if base and base["rps"] else float("nan")
        lines.append(f"| {r['scenario']} | {r['variant']} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['errors']} | {ratio:.2f} |")
    lines += ["", ("append one event + interests, in process (Session, no HTTP; both timed interleaved, "
                   f"{args.repeats} calls each, either alternating call by call (cold: each call follows the other "
                   f"session's) or in alternating blocks of {args.inproc_block} calls (each session's working set "
                   "mostly warm, as in a server answering a stream of requests); the minimum is the least disturbed by other load; cpu = CPU time of "
                   "the process, which load from elsewhere inflates far less than the wall clock; state: appends "
                   "kept in memory, or durable: written to the state store's event log file before append returns, states "
                   "checkpointed to SQLite behind it):"), "",
              ("| state | order | persons per call | method | median ms | min ms | p95 ms | cpu median ms | x torch (median) | "
               "x torch (min) | x torch (cpu median) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    stock = {(r["state"], r["persons"], r["order"]): r for r in inproc if r["variant"] == "torch"}
    for r in inproc:
        base = stock[r["state"], r["persons"], r["order"]]
        lines.append(f"| {r['state']} | {r['order']} | {r['persons']} | {r['method']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                     f"{r['p95_ms']:.3f} | {r['cpu_median_ms']:.3f} | {base['median_ms'] / r['median_ms']:.1f} | "
                     f"{base['min_ms'] / r['min_ms']:.1f} | {base['cpu_median_ms'] / r['cpu_median_ms']:.1f} |")
    md = "\n".join(lines) + "\n"
    (out / "serve.md").write_text(md)
    (out / "serve.json").write_text(json.dumps({"http": results, "in_process": inproc, "command": cmd,
                                                "machine": device_tag()}, indent=1))
    print()
    print(md)
    print(f"wrote {out / 'serve.md'}")


if __name__ == "__main__":
    sys.exit(main())
