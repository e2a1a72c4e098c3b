"""`fastinterest predict|recommend|similar|target|explain RUN ...` (apps on a trained run).

Every command takes the run directory, `--data DIR` (the prepared dir; default: the one the run was
trained on) and `--json` for machine-readable output.
"""
from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (from `fastinterest train`)")
    p.add_argument("--data", default=None, help="prepared data directory (default: the run's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict a person's interests (known person or new from events)")
    _common(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--person", help="prepared person id or pseudonym")
    who.add_argument("--events", help="JSON file: a list of raw event records of a new person ('-' = stdin)")
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(func=_predict)

    r = subparsers.add_parser("recommend", help="recommend items to a person")
    _common(r)
    r.add_argument("--person", required=True)
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--include-seen", action="store_true", help="also recommend items already in the history")
    r.set_defaults(func=_recommend)

    s = subparsers.add_parser("similar", help="persons with the most similar user vectors (cosine)")
    _common(s)
    s.add_argument("--person", required=True)
    s.add_argument("-k", type=int, default=10)
    s.set_defaults(func=_similar)

    t = subparsers.add_parser("target", help="the persons most interested in a category")
    _common(t)
    t.add_argument("--category", required=True, help="category token (as in vocab.json)")
    t.add_argument("-k", type=int, default=20)
    t.set_defaults(func=_target)

    e = subparsers.add_parser("explain", help="which past events drive a person's interest in a category")
    _common(e)
    e.add_argument("--person", required=True)
    e.add_argument("--category", required=True)
    e.add_argument("-k", type=int, default=10)
    e.set_defaults(func=_explain)


def _app(args):
    from . import InterestApp, Run

    run = Run.load(args.run)
    return InterestApp.from_prepared(run, args.data)


def _print_pairs(pairs, args, header) -> int:
    if args.json:
        print(json.dumps([{header[0]: a, header[1]: b} for a, b in pairs]))
    else:
        print(f"{header[0]:<32} {header[1]}")
        for a, b in pairs:
            print(f"{str(a):<32} {b:.4f}")
    return 0


def _predict(args) -> int:
    app = _app(args)
    if args.events:
        records = json.load(sys.stdin if args.events == "-" else open(args.events))
        return _print_pairs(app.predict_interests(events=records, k=args.k), args, ("category", "probability"))
    return _print_pairs(app.predict_interests(args.person, k=args.k), args, ("category", "probability"))


def _recommend(args) -> int:
    app = _app(args)
    return _print_pairs(app.recommend(args.person, k=args.k, exclude_seen=not args.include_seen), args,
                        ("item", "score"))


def _similar(args) -> int:
    return _print_pairs(_app(args).similar_users(args.person, k=args.k), args, ("person", "cosine"))


def _target(args) -> int:
    return _print_pairs(_app(args).target_users(args.category, k=args.k), args, ("person", "probability"))


def _explain(args) -> int:
    res = _app(args).explain(args.person, args.category, k=args.k)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"P(interest in {res['category']}) = {res['probability']:.4f}   ({res['method']})")
    print(f"{'steps ago':>9}  {'contribution':>12}  item / category / action / platform")
    for ev in res["events"]:
        print(f"{ev['steps_before_end']:>9}  {ev['contribution']:>+12.4f}  {ev['item']} / {ev['category']} / "
              f"{ev['action']} / {ev['platform']}")
    return 0
