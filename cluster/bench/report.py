"""Per-run statistics with the field names of `vllm bench serve`, goodput under an SLO, and plots."""
from __future__ import annotations

import statistics
from typing import Any

from cluster.bench.backends import Record


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(prefix: str, xs_s: list[float], out: dict[str, Any]) -> None:
    xs = [x * 1000 for x in xs_s]
    out[f"mean_{prefix}_ms"] = statistics.fmean(xs) if xs else float("nan")
    out[f"median_{prefix}_ms"] = _pct(xs, 50)
    out[f"p90_{prefix}_ms"] = _pct(xs, 90)
    out[f"p99_{prefix}_ms"] = _pct(xs, 99)


def summarize(records: list[Record], duration_s: float, slo: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    n_out = [r.n_output if r.n_output is not None else len(r.token_times) for r in ok]
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration_s,
        "total_input_tokens": sum(r.input_len for r in ok),
        "total_output_tokens": sum(n_out),
        "request_throughput": len(ok) / duration_s,
        "input_throughput": sum(r.input_len for r in ok) / duration_s,
        "output_throughput": sum(n_out) / duration_s,
    }
    _stats("ttft", [r.ttft for r in ok], out)
    _stats("tpot", [t for r in ok if (t := r.tpot) is not None], out)
    _stats("itl", [x for r in ok for x in r.itls], out)
    _stats("e2el", [r.e2e for r in ok], out)
    good = [r for r in ok if _meets(r, slo)]
    out["slo"] = {k: v for k, v in slo.items()}
    out["goodput"] = len(good) / duration_s
    out["slo_attainment"] = 100.0 * len(good) / len(records) if records else float("nan")
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out["errors"] = errors
    # per request, in send order (like `vllm bench serve --save-detailed`), for digging into misses
    out["input_lens"] = [r.input_len for r in records]
    out["ttfts_ms"] = [round(r.ttft * 1000, 1) if r.ok else None for r in records]
    out["tpots_ms"] = [round(t * 1000, 1) if r.ok and (t := r.tpot) is not None else None for r in records]
    out["met_slo"] = [r.ok and _meets(r, slo) for r in records]
    return out


def _meets(r: Record, slo: dict[str, float]) -> bool:
    if "ttft" in slo and r.ttft * 1000 > slo["ttft"]:
        return False
    tpot = r.tpot
    if "tpot" in slo and tpot is not None and tpot * 1000 > slo["tpot"]:
        return False
    if "e2el" in slo and r.e2e * 1000 > slo["e2el"]:
        return False
    return True


def table(runs: list[dict[str, Any]]) -> str:
    cols = [("rate", "request_rate"), ("done", "completed"), ("fail", "failed"), ("req/s", "request_throughput"),
            ("out tok/s", "output_throughput"), ("p50 TTFT", "median_ttft_ms"), ("p99 TTFT", "p99_ttft_ms"),
            ("p50 TPOT", "median_tpot_ms"), ("p99 TPOT", "p99_tpot_ms"), ("p99 ITL", "p99_itl_ms"),
            ("goodput", "goodput"), ("SLO %", "slo_attainment")]
    lines = ["  ".join(f"{c:>9}" for c, _ in cols)]
    for r in runs:
        cells = []
        for _, k in cols:
            v = r.get(k)
            cells.append(f"{v:>9.2f}" if isinstance(v, float) else f"{str(v):>9}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


PANELS = [("p99_ttft_ms", "p99 TTFT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)"), ("p99_itl_ms", "p99 ITL (ms)"),
          ("goodput", "goodput (req/s meeting SLO)")]


def plot(series: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
    """p99 TTFT, p99 TPOT and p99 ITL against request rate; one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if all(len(runs) == 1 for runs in series.values()):  # one point each (a fixed concurrency): bars
        _bars(plt, series, path, title)
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label) in zip(axes, PANELS):
        for name, runs in series.items():
            pts = sorted((r["request_rate"], r[key]) for r in runs if r.get(key) == r.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key != "goodput":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(plt: Any, series: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """One bar per system for output tokens/s and each latency panel (runs at one fixed load)."""
    names = list(series)
    panels = [("output_throughput", "output tokens/s"), *PANELS]
    fig, axes = plt.subplots(1, len(panels), figsize=(22, 4.8))
    colors = [f"C{i}" for i in range(len(names))]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(range(len(names)), [series[n][0].get(key, float("nan")) for n in names], color=colors)
        ax.set_xticks([])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        if key.endswith("_ms"):
            ax.set_yscale("log")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in colors], names, loc="lower center",
               ncol=min(len(names), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
