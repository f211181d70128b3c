#!/bin/sh
# pdserve 1P1D (deploy/local.yaml) on the two comparison workloads; then the overlay plots.
set -eu
B=".venv/bin/pdserve bench --config deploy/local.yaml --seed 7 --quiet"
$B --label "pdserve 1P1D (fp32, 1+1 cores)" --workload prefill-heavy --num-prompts 24 --rate 0.5,1 \
   --slo ttft:5000 tpot:150 --output bench/results/prefill_heavy_pdserve_1p1d.json
$B --label "pdserve 1P1D (fp32, 1+1 cores)" --workload decode-heavy --num-prompts 32 --rate inf --max-concurrency 16 \
   --slo ttft:5000 tpot:150 --output bench/results/decode_heavy_pdserve_1p1d.json
for w in prefill_heavy decode_heavy; do
  [ -f bench/results/${w}_vllm.json ] || continue
  .venv/bin/pdserve bench --compare bench/results/${w}_pdserve_1p1d.json bench/results/${w}_vllm.json \
    --plot bench/results/${w}.png
done
