#!/bin/sh
# A longer prefill-heavy trace (48 requests per rate, 0.5 / 1 / 1.5 req/s) for the systems that
# matter most, to see the curve and the run-to-run noise: pdserve 1P1D and 2P1D, aggregated, vLLM.
# OUT=dir writes elsewhere (a repeat run).
set -eu
OUT=${OUT:-bench/results/sweep}
export OUT
mkdir -p "$OUT"
B=".venv/bin/pdserve bench --seed 7 --quiet --slo ttft:5000 tpot:150 --workload prefill-heavy --num-prompts 48 --rate 0.5,1,1.5"
$B --config deploy/local.yaml --label "pdserve 1P1D (2 cores)" --output "$OUT/prefill_heavy_pdserve_1p1d.json"
$B --config deploy/2p1d.yaml --label "pdserve 2P1D (2 cores)" --output "$OUT/prefill_heavy_pdserve_2p1d.json"
$B --config deploy/aggregated.yaml --label "pdserve aggregated (Sarathi, 2x1 core)" \
   --output "$OUT/prefill_heavy_aggregated.json"
[ -x .peers/vllm/bin/python ] && sh bench/peers/vllm.sh sweep
.venv/bin/pdserve bench --compare "$OUT"/prefill_heavy_*.json --plot "$OUT/prefill_heavy.png"
