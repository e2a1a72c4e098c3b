"""The one benchmark harness (DESIGN.md section 6).

    from harness import Sweep, measure, setup_threads
    setup_threads(2)
    sweep = Sweep("embedding_bag_forward", baseline="torch")
    stats = measure(lambda: fn(x))              # median/p20/p80 in milliseconds
    sweep.add({"V": 10**6, "D": 64}, "fi-ext", stats, bytes=...)
    sweep.write()   # CSV + markdown (ratios vs the baseline from the same run) + PNG under results/<device>/

Correctness is checked by each sweep before timing (`check_close`). Timings are medians of
`repeat` calls after `warmup`; absolute numbers drift 10-15% between runs on shared machines, so
compare the ratios of one run.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def setup_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(n))


def device_tag(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    short = "-".join(model.lower().replace("(r)", "").replace("(tm)", "").split()[:3])
    return f"cpu-{short}-{torch.get_num_threads()}t"


def measure(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 15, sync: Callable | None = None,
            max_seconds: float = 20.0) -> dict:
    """Time `fn` (milliseconds): median, p20, p80 over `repeat` calls (fewer if max_seconds runs out)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return _stats(times)


def _stats(times: list) -> dict:
    """Median, p20, p80 (milliseconds) and count of a list of call times."""
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "n": len(times)}


def measure_interleaved(fns: dict, *, warmup: int = 2, repeat: int = 15, sync: Callable | None = None,
                        max_seconds: float = 60.0) -> dict:
    """Time several providers of the same case round-robin (one call of each per round), so that a slow
    spell of a shared machine lands on all of them instead of biasing the ratio of whichever ran then.
    The order rotates by one provider per round, so no provider always follows the same one (a provider
    that ran just before on the same memory would leave it warm for the next). Returns {name: the stats
    of `measure`}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if sync:
        sync()
    times: dict = {name: [] for name in fns}
    start = time.perf_counter()
    names = list(fns)
    for rnd in range(repeat):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            if sync:
                sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and rnd + 1 >= 3:
            break
    return {name: _stats(ts) for name, ts in times.items()}


def check_close(a, b, *, atol: float, rtol: float, what: str) -> None:
    import torch

    if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
        err = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"{what}: results differ from the baseline (max abs err {err:.3g})")


class Sweep:
    """Rows of (case parameters, provider, timing); written as CSV, markdown and PNG."""

    def __init__(self, name: str, baseline: str = "torch", device: str = "cpu"):
        self.name, self.baseline, self.device = name, baseline, device
        self.rows: list[dict] = []

    def add(self, case: dict, provider: str, stats: dict, **extra) -> dict:
        row = {"case": json.dumps(case, sort_keys=False), **case, "provider": provider, **stats, **extra}
        self.rows.append(row)
        print(f"  {self.name:<28} {provider:<16} {json.dumps(case):<70} "
              f"{stats['median_ms']:9.3f} ms  (p20 {stats['p20_ms']:.3f}, p80 {stats['p80_ms']:.3f})"
              + "".join(f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}" for k, v in extra.items()),
              flush=True)
        return row

    def ratios(self) -> list[dict]:
        """Each row with `speedup` = baseline median / this median, baseline from the same case."""
        base = {r["case"]: r["median_ms"] for r in self.rows if r["provider"] == self.baseline}
        out = []
        for r in self.rows:
            b = base.get(r["case"])
            out.append({**r, "speedup": (b / r["median_ms"]) if b else float("nan")})
        return out

    def markdown(self) -> str:
        rows = self.ratios()
        extra_cols = [k for k in rows[0] if k not in ("case", "provider", "median_ms", "p20_ms", "p80_ms", "n",
                                                      "speedup")] if rows else []
        head = ["case", "provider", "median ms", "p20", "p80", f"x vs {self.baseline}"]
        extras = [k for k in extra_cols if not any(k in json.loads(r["case"]) for r in rows)]
        head += extras
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["case"].replace("|", "/"), r["provider"], f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}",
                     f"{r['p80_ms']:.3f}", f"{r['speedup']:.2f}"]
            for k in extras:
                v = r.get(k, "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, out_dir: Path | None = None, command: str = "") -> Path:
        out_dir = Path(out_dir or RESULTS / device_tag(self.device))
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self.ratios()
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(out_dir / f"{self.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        md = f"# {self.name}\n\nmachine: `{device_tag(self.device)}`, {time.strftime('%Y-%m-%d')}\n"
        if command:
            md += f"\nreproduce: `{command}`\n"
        md += "\n" + self.markdown() + "\n"
        (out_dir / f"{self.name}.md").write_text(md)
        self._plot(out_dir / f"{self.name}.png", rows)
        return out_dir

    def _plot(self, path: Path, rows: list[dict]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        cases = list(dict.fromkeys(r["case"] for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases) + 3), 4.5))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ys = []
            for c in cases:
                m = [r["speedup"] for r in rows if r["case"] == c and r["provider"] == p]
                ys.append(m[0] if m else 0.0)
            ax.bar([k + i * width for k in range(len(cases))], ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
        ax.set_xticklabels([c[:40] for c in cases], rotation=60, ha="right", fontsize=6)
        ax.set_ylabel(f"speed-up vs {self.baseline} (same run)")
        ax.set_title(f"{self.name} on {device_tag(self.device)}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
