"""Print the README's markdown tables from bench JSONs: python bench/table.py bench/results/prefill_heavy_*.json"""
from __future__ import annotations

import json
import sys

COLS = [("rate", "request_rate", "{:g}"), ("out tok/s", "output_throughput", "{:.1f}"),
        ("p50 TTFT", "median_ttft_ms", "{:.0f} ms"), ("p99 TTFT", "p99_ttft_ms", "{:.0f} ms"),
        ("p50 TPOT", "median_tpot_ms", "{:.0f} ms"), ("p99 TPOT", "p99_tpot_ms", "{:.0f} ms"),
        ("p99 ITL", "p99_itl_ms", "{:.0f} ms"), ("goodput", "goodput", "{:.2f}"), ("SLO met", "slo_attainment", "{:.0f} %")]


def rows(path: str) -> list[tuple[str, dict]]:
    data = json.load(open(path))
    runs = data["runs"] if isinstance(data, dict) else data
    return [(r.get("label") or data.get("label", path), r) for r in runs]


def main(paths: list[str]) -> None:
    print("| system | " + " | ".join(c for c, _, _ in COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    everything = [x for p in paths for x in rows(p)]
    for label, r in sorted(everything, key=lambda x: (x[1].get("request_rate", 0), x[0])):
        cells = []
        for _, key, fmt in COLS:
            v = r.get(key)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
