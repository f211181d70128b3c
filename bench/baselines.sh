#!/bin/sh
# The same engine in the two other shapes, on the same two cores and trace as bench/pdserve.sh:
# aggregated (prefill + decode on each worker, Sarathi-style mixing) and static batching.
set -eu
B=".venv/bin/pdserve bench --seed 7 --quiet --slo ttft:5000 tpot:150"
for shape in aggregated static; do
  case $shape in
    aggregated) label="pdserve aggregated (Sarathi, 2x1 core)";;
    static) label="pdserve static batching (2x1 core)";;
  esac
  $B --config deploy/$shape.yaml --label "$label" --workload prefill-heavy --num-prompts 24 --rate 0.5,1 \
     --output bench/results/prefill_heavy_$shape.json
  $B --config deploy/$shape.yaml --label "$label" --workload decode-heavy --num-prompts 32 --rate inf \
     --max-concurrency 16 --output bench/results/decode_heavy_$shape.json
done
