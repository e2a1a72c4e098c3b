"""Benchmark `fastinterest prepare` end to end on synthetic events: events/s and peak memory.

    python benchmarks/bench_prepare.py --events 10000000            # target: >= 500k events/s, <= 4 GiB
    python benchmarks/bench_prepare.py --events 1000000 --format csv --repeat 3

The synthetic input (with its links file) is generated once and cached under --cache. Each repeat runs
`prepare` in a fresh child process, so its peak RSS (getrusage ru_maxrss) covers prepare alone, from
reading the files to writing the prepared directory. Prints each run and the median; the machine's load
average is printed too, because other work on a shared machine slows every phase.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_EVENTS_PER_S = 500_000
TARGET_PEAK_GIB = 4.0


def _import_fastinterest():
    try:
        import fastinterest  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "python"))


def child(args) -> None:
    """Run one prepare and print a JSON line with its report and peak RSS."""
    _import_fastinterest()
    from fastinterest.data import prepare

    t0 = time.perf_counter()
    report = prepare(args.input, args.out, links=args.links, key="bench", threads=args.threads)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"wall_s": wall, "peak_bytes": peak, "rows_read": report["rows_read"],
                      "rows_kept": report["rows_kept"], "timings": report["timings"]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="prepare's threads (default: its own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/fastinterest-bench")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--links", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    _import_fastinterest()
    from fastinterest.data import generate_synthetic

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    events = cache / f"synthetic_{args.events}_seed{args.seed}.{args.format}"
    links = cache / f"synthetic_{args.events}_seed{args.seed}.links.csv"
    if not (events.exists() and links.exists()):
        t0 = time.perf_counter()
        print(f"generating {args.events:,} events -> {events} ...", flush=True)
        generate_synthetic(args.events, events, seed=args.seed)
        print(f"  generated in {time.perf_counter() - t0:.1f} s ({events.stat().st_size / 2**20:.0f} MiB)")
    out = cache / "prepared"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "python"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    runs = []
    for i in range(args.repeat):
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", "--input", str(events), "--links", str(links), "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stdout, res.stderr, file=sys.stderr)
            return res.returncode
        run = json.loads(res.stdout.strip().splitlines()[-1])
        run["events_per_s"] = run["rows_read"] / run["wall_s"]
        runs.append(run)
        phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in run["timings"].items() if k not in ("total_s", "cpu_s"))
        print(f"run {i + 1}: {run['wall_s']:.2f} s, {run['events_per_s'] / 1e3:,.0f}k events/s, "
              f"CPU {run['timings']['cpu_s']:.1f} s, peak RSS {run['peak_bytes'] / 2**30:.2f} GiB "
              f"(load avg before: {load:.1f}) [{phases}]", flush=True)
    eps = statistics.median(r["events_per_s"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    peak = max(r["peak_bytes"] for r in runs) / 2**30
    ok = eps >= TARGET_EVENTS_PER_S and peak <= TARGET_PEAK_GIB
    print(f"median of {len(runs)}: {args.events:,} {args.format} events in {wall:.2f} s = {eps / 1e3:,.0f}k events/s; "
          f"peak RSS {peak:.2f} GiB; target >= {TARGET_EVENTS_PER_S / 1e3:.0f}k/s and <= {TARGET_PEAK_GIB:.0f} GiB: "
          f"{'met' if ok else 'NOT met'} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
