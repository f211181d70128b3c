"""The load generator's statistics and SLO accounting on synthetic records (no server)."""
from __future__ import annotations

import math

from cluster.bench.backends import Record
from cluster.bench.report import plot, summarize
from cluster.bench.workloads import build, lengths
from engine.tiny import tiny_tokenizer


def _rec(sent: float, times: list[float], n_in: int = 10) -> Record:
    return Record(n_in, len(times), sent=sent, token_times=times)


def test_summary_fields_and_goodput() -> None:
    fast = _rec(0.0, [0.1, 0.2, 0.3])  # ttft 100 ms, tpot 100 ms
    slow = _rec(0.0, [2.0, 2.1])  # ttft 2 s
    failed = Record(10, 5, sent=0.0, error="UNAVAILABLE: gone")
    s = summarize([fast, slow, failed], duration_s=4.0, slo={"ttft": 500, "tpot": 150})
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == {"UNAVAILABLE": 1}
    assert s["output_throughput"] == 5 / 4.0 and s["request_throughput"] == 0.5
    assert math.isclose(s["median_ttft_ms"], 1050.0) and math.isclose(s["p99_ttft_ms"], 100 + 1900 * 0.99)
    assert math.isclose(s["mean_tpot_ms"], 100.0)
    assert s["goodput"] == 1 / 4.0 and math.isclose(s["slo_attainment"], 100 / 3)
    for key in ("mean_ttft_ms", "p90_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_tpot_ms"):
        assert key in s
    assert s["input_lens"] == [10, 10, 10] and s["met_slo"] == [True, False, False]
    assert s["ttfts_ms"] == [100.0, 2000.0, None]


def test_plots_curves_for_rate_sweeps_and_bars_for_one_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = summarize([_rec(0.0, [0.1, 0.2, 0.3])], duration_s=1.0, slo={})
    sweep = {"a": [{**run, "request_rate": 0.5}, {**run, "request_rate": 1.0}], "b": [{**run, "request_rate": 1.0}]}
    plot(sweep, str(tmp_path / "sweep.png"), title="sweep")
    plot({"a": [run], "b": [run]}, str(tmp_path / "bars.png"), title="one load")
    for name in ("sweep.png", "bars.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workloads_have_the_promised_shapes() -> None:
    heavy = lengths("prefill-heavy", 1000, seed=0, input_len=0, output_len=0)
    longs = [x for x in heavy if x[0] == 1024]
    assert len(longs) == 200 and all(o == 16 for _, o in longs)
    assert sum(i == 1024 for i, _ in lengths("prefill-heavy", 24, 0, 0, 0)) == 5
    assert set(lengths("decode-heavy", 5, 0, 0, 0)) == {(32, 256)}
    tok = tiny_tokenizer()
    specs = build("fixed", 4, tok, seed=1, input_len=50, output_len=7)
    assert all(abs(s.input_len - 50) <= 2 and s.output_len == 7 for s in specs)
    assert len({s.prompt for s in specs}) > 1  # different corpus offsets
    shared = build("shared-prefix", 3, tok, seed=2)
    assert len({s.prompt[:1000] for s in shared}) == 1 and len({s.prompt for s in shared}) == 3
    assert all(abs(s.input_len - 1088) <= 2 and s.output_len == 64 for s in shared)
