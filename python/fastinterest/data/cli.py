"""`fastinterest generate` and `fastinterest prepare` (registered by `fastinterest.cli`)."""
from __future__ import annotations

import argparse
import sys
import time

from .adapters import FORMATS
from .io import DEFAULT_CHUNK_ROWS
from .schema import DEFAULT_MAX_EVENTS_PER_SECOND, DataError


def _generate(args: argparse.Namespace) -> int:
    from .synthetic import generate_synthetic

    t0 = time.perf_counter()
    summary = generate_synthetic(args.events, args.out, links=args.links, seed=args.seed,
                                 n_categories=args.categories, fault_rate=args.fault_rate,
                                 max_events_per_second=args.max_events_per_second)
    faults = ", ".join(f"{k} {v}" for k, v in summary["faults"].items())
    print(f"wrote {summary['rows']:,} rows ({summary['valid_events']:,} valid events of {summary['persons']:,} "
          f"persons, {summary['items']:,} items) in {time.perf_counter() - t0:.1f} s")
    print(f"  events: {summary['events']}\n  links:  {summary['links']}\n  truth:  {summary['truth']}")
    print(f"  injected faults: {faults}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    try:
        report = prepare(
            args.events, args.out, links=args.links, format=args.format, key=args.key, min_count=args.min_count,
            max_events_per_second=args.max_events_per_second, min_time=args.min_time, max_time=args.max_time,
            actions=args.actions.split(",") if args.actions else None, write_mapping=args.write_mapping,
            chunk_rows=args.chunk_rows, progress=None)
    except DataError as exc:
        print(f"fastinterest prepare: error: {exc}", file=sys.stderr)
        return 1
    t = report["timings"]
    dropped = report["dropped"]
    print(f"prepared {args.out}: {report['rows_kept']:,} of {report['rows_read']:,} rows kept, "
          f"{report['persons']:,} persons ({report['accounts']:,} accounts), {report['items']:,} items, "
          f"{report['categories']:,} categories")
    print("  dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items() if v) or "nothing"))
    print("  events per platform: " + ", ".join(f"{k} {v:,}" for k, v in report["events_per_platform"].items()))
    print(f"  {t['total_s']:.2f} s ({report['events_per_second']:,.0f} rows/s): "
          + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in t.items() if k not in ("total_s", "cpu_s")))
    for example in report["malformed_examples"]:
        print(f"  malformed: {example}")
    return 0


def register(subparsers) -> None:
    """Add the `generate` and `prepare` sub-commands."""
    g = subparsers.add_parser("generate", help="write a synthetic cross-platform event log with planted interests",
                              description="Write a synthetic event log (CSV or Parquet), a links file and a "
                                          "truth file (planted interests, fault counts) beside it.")
    g.add_argument("--events", type=int, required=True, metavar="N", help="rows to write (valid events + faults)")
    g.add_argument("--out", required=True, metavar="FILE", help="events file, .csv or .parquet")
    g.add_argument("--links", metavar="FILE", help="links file (default: <stem>.links.csv beside --out)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--categories", type=int, default=40, help="number of categories (<= 50)")
    g.add_argument("--fault-rate", type=float, default=0.01, help="share of injected fault rows")
    g.add_argument("--max-events-per-second", type=int, default=DEFAULT_MAX_EVENTS_PER_SECOND,
                   help="bot threshold the bursts must exceed")
    g.set_defaults(func=_generate)

    p = subparsers.add_parser("prepare", help="clean, link, pseudonymise and encode raw events",
                              description="Clean, link, pseudonymise and encode raw events into DIR "
                                          "(events.parquet, vocab.json, persons.parquet, report.json, config.json).")
    p.add_argument("--events", nargs="+", required=True, metavar="FILE", help="event files (or a data set directory)")
    p.add_argument("--links", nargs="*", metavar="FILE", help="account links files")
    p.add_argument("--format", choices=FORMATS, default="generic")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--max-events-per-second", type=int, default=None, metavar="X",
                   help=f"drop an account's events in a second with more than X events (0: off; default "
                        f"{DEFAULT_MAX_EVENTS_PER_SECOND}, off for amazon-cdsr)")
    p.add_argument("--min-count", type=int, default=1, metavar="K",
                   help="items, categories and query words seen fewer than K times become <unk>")
    p.add_argument("--key", metavar="K", help="pseudonym key (default: $FASTINTEREST_PSEUDONYM_KEY, else a "
                                              "public default, with a warning)")
    p.add_argument("--write-mapping", action="store_true",
                   help="also write mapping.parquet (raw account ids -> person); keep it private")
    p.add_argument("--min-time", type=int, metavar="UNIX",
                   help="earliest valid timestamp (default 1990-01-01; taobao: 2017-11-25 UTC+8)")
    p.add_argument("--max-time", type=int, metavar="UNIX",
                   help="timestamps from here on are out of range (default 2100-01-01; taobao: 2017-12-04 UTC+8)")
    p.add_argument("--actions", metavar="A,B,...", help="the action vocabulary (default: view,click,search,cart,"
                                                          "favorite,purchase,like,comment,share,rate)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help=argparse.SUPPRESS)
    p.set_defaults(func=_prepare)
