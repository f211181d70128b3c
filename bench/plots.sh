#!/bin/sh
# Overlay every system measured on each workload into bench/results/<workload>.png.
set -eu
for w in prefill_heavy decode_heavy; do
  files=$(ls bench/results/${w}_*.json)
  .venv/bin/pdserve bench --compare $files --plot bench/results/${w}.png
done
