"""`python -m fastinterest.info` (or `fastinterest info`): what runs here, from the dispatcher's records.

Prints the build of each native module, then for every op the backend x device x dtype table:
"yes" where the backend can run, otherwise the reason it cannot, and which backend the automatic
choice picks.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import _dispatch, _ext

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def table() -> list[dict]:
    rows = []
    for op in _dispatch.ops():
        for dev in DEVICES:
            for dt in DTYPES:
                try:
                    chosen = _dispatch.resolve(op, dev, dt)
                except _dispatch.BackendError:
                    chosen = None
                for impl in _dispatch.impls(op):
                    rows.append({"op": op, "device": dev, "dtype": str(dt).replace("torch.", ""),
                                 "backend": impl.backend, "why_not": _dispatch.why_not(op, impl.backend, dev, dt),
                                 "chosen": impl.backend == chosen})
    return rows


def render(rows: list[dict], verbose: bool = False) -> str:
    out = []
    for name, info in _ext.build_info().items():
        out.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    out.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"cuda {'available' if torch.cuda.is_available() else 'not available'}")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for op in ops:
        out.append("")
        out.append(f"## {op}")
        out.append("| device | dtype | " + " | ".join(backends) + " |")
        out.append("|---|---|" + "---|" * len(backends))
        reasons = {}
        for dev in DEVICES:
            for dt in DTYPES:
                dts = str(dt).replace("torch.", "")
                cells = []
                for b in backends:
                    r = next((r for r in rows if r["op"] == op and r["device"] == dev and r["dtype"] == dts
                              and r["backend"] == b), None)
                    if r is None:
                        cells.append("-")
                    elif r["why_not"] is None:
                        cells.append("**chosen**" if r["chosen"] else "yes")
                    else:
                        key = len(reasons) + 1
                        reasons.setdefault(r["why_not"], key)
                        cells.append(f"no [{reasons[r['why_not']]}]")
                out.append(f"| {dev} | {dts} | " + " | ".join(cells) + " |")
        out.append("")
        for why, k in reasons.items():
            out.append(f"[{k}] {why}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastinterest.info", description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    print(render(table()))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="print the native builds and the backend x device x dtype table")
    p.set_defaults(func=lambda args: main([]))


if __name__ == "__main__":
    sys.exit(main())
