#!/bin/sh
# pdserve on the two comparison workloads: 1P1D (deploy/local.yaml) on both, and the P:D ratio that
# suits each (2P1D for prefill-heavy, 1P2D for decode-heavy), all on the same two cores. Then the
# overlay plots of every system whose JSON is in bench/results (bench/baselines.sh, bench/peers/).
set -eu
B=".venv/bin/pdserve bench --seed 7 --quiet --slo ttft:5000 tpot:150"
PH="--workload prefill-heavy --num-prompts 24 --rate 0.5,1"
DH="--workload decode-heavy --num-prompts 32 --rate inf --max-concurrency 16"
$B --config deploy/local.yaml --label "pdserve 1P1D (2 cores)" $PH --output bench/results/prefill_heavy_pdserve_1p1d.json
$B --config deploy/2p1d.yaml --label "pdserve 2P1D (2 cores)" $PH --output bench/results/prefill_heavy_pdserve_2p1d.json
$B --config deploy/local.yaml --label "pdserve 1P1D (2 cores)" $DH --output bench/results/decode_heavy_pdserve_1p1d.json
$B --config deploy/1p2d.yaml --label "pdserve 1P2D (2 cores)" $DH --output bench/results/decode_heavy_pdserve_1p2d.json
sh bench/plots.sh
