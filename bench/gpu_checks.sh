#!/bin/sh
# Every GPU check and figure of issues 9 and 10 on one CUDA machine, logs and JSON under $OUT.
# Run from the project root after `sh bench/gpu_pack.sh` here, carrying .gpu:
#     . .gpu/setup.sh && sh bench/gpu_checks.sh tests      # tests/gpu (~3 min)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh step       # 1.1B: floor / graphs / eager / HF at 1, 16, 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh step8b     # 8B: the same at 1, 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh qwen3      # Qwen3-8B shape (per-head q/k norms): the same at 1, 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh families   # Gemma 3 1B, Gemma 2 2B, GLM-4-9B shapes: the step at 1, 64
#                                                           # against each one's floor (head_dim 256, soft-capping, pairs rotary)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh fp8       # 8B and 1.1B shapes: bf16, model.quantization fp8 (FP8 linear
#                                                           # layers, engine/triton_fp8.py), kv_cache.dtype fp8, both:
#                                                           # the step at 1, 64, same run
#     . .gpu/setup.sh && sh bench/gpu_checks.sh gptoss     # gpt-oss-20b's shape with MXFP4 experts as released (~13 GB
#                                                           # written): sinks, MXFP4 grouped matmuls; the step at 1, 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh moe        # Qwen3-30B-A3B's layer x 24 (128 experts, 8 a token; 30 GB
#                                                           # built, saved, loaded: ~5 min): the same at 1, 16, 64,
#                                                           # then with model.quantization fp8 (FP8 experts)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh spec       # 1.1B: what drafts (decode.speculative) cost a decode step through the
#                                                           # graphs: 1, 4, 16 rows with 0, 1, 2, 4 drafts each (< 2 min)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh mixed      # 1.1B: 32 decode rows + a prompt chunk of 16..224 tokens at 0, 512, 1536:
#                                                           # as rows of the graphs against the eager forward, and which one
#                                                           # the worker's rule picks (< 2 min)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh mla        # the latent attention kernels alone (engine/triton_mla.py; < 1 min, no
#                                                           # model): decode at 1, 16, 64 x 512, 4096 tokens for 16 and 128 heads
#                                                           # against the bytes read and the expanded form
#     . .gpu/setup.sh && sh bench/gpu_checks.sh deepseek   # DeepSeek-V2-Lite's shape (27 layers, 64 experts, ~32 GB built): the step
#                                                           # at 1, 16, 64 with its latent attention absorbed (engine/triton_mla.py),
#                                                           # then at 1, 64 with an FP8 KV cache
#     . .gpu/setup.sh && sh bench/gpu_checks.sh serve      # 1.1B through router + Ray: aggregated and 1P1D; the router alone at 32k tok/s
#                                                           # (OVERLAP=false: every decode step completes before the next, to compare)
#     . .gpu/setup.sh && sh bench/gpu_checks.sh host       # 1.1B, one worker in-process: a decode step's host parts, steps in flight on/off,
#                                                           # drawn rows (temperature 0.8, top-p 0.95), rows starting blocks at different
#                                                           # steps (--stagger, as served), one penalized row among 64 (its batch
#                                                           # sampled once the step before completes), 8 rows held to a
#                                                           # regex among 64 (masks on the host), and a torch profile at 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh handoff    # 1.1B, 1000-token prompt: ipc, then NCCL (over sockets on one GPU);
#                                                           # the protocol alone (a 16-token prompt) both ways; TTFT with
#                                                           # prefill.overlap_reserve on and off (ipc, twice each, alternating);
#                                                           # and whether a dead owner's IPC-mapped cache keeps its memory
#     . .gpu/setup.sh && sh bench/gpu_checks.sh sampler    # one sample() call per kind, vocabularies 32k and 128k, batch 1 and 64
#     . .gpu/setup.sh && sh bench/gpu_checks.sh issue10    # issue 10's open target first, for a short lease (15 min of device
#                                                           # time, cold start included): 64 streams through router + Ray,
#                                                           # aggregated and 1P1D with steps in flight, aggregated without,
#                                                           # each against the bare forward of the same run; then one step's
#                                                           # torch profile at 64 in-process (the note's "where the time goes").
#                                                           # Then `tests` in a second call.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
model() {  # $1 shape → path
  [ -f "/tmp/llama-$1/config.json" ] || python3 bench/make_model.py --shape "$1" --out "/tmp/llama-$1" \
    --device cuda --dtype bfloat16 > "$OUT/make-$1.log" 2>&1
  echo "/tmp/llama-$1"
}
yaml() {  # $1 model path, $2 mode (aggregated | disaggregated) → a config file
  f="$OUT/serve-$2${OVERLAP:+-overlap-$OVERLAP}.yaml"
  cat > "$f" <<YAML
mode: $2
model: {path: $1, dtype: bfloat16, device: cuda, max_model_len: 2048}
prefill: {replicas: 1, num_gpus: 0.5, max_batch_tokens: 2048, chunk_tokens: 1024}
decode: {replicas: 1, num_gpus: 0.5, max_batch_size: 64, overlap_steps: ${OVERLAP:-true}}
aggregated: {replicas: 1, num_gpus: 1, max_batch_size: 64, max_batch_tokens: 2048, chunk_tokens: 1024, overlap_steps: ${OVERLAP:-true}}
server: {http_port: null}
YAML
  echo "$f"
}
case "${1:-tests}" in
  tests)   python3 -m pytest tests/gpu -q -rs 2>&1 | tee "$OUT/tests.log" | tail -30 ;;
  step)    python3 bench/gpu_step.py --model-path "$(model 1.1b)" --batches 1,16,64 --profile \
             --output "$OUT/step-1.1b.json" 2>&1 | tee "$OUT/step-1.1b.log" | tail -8 ;;
  step8b)  python3 bench/gpu_step.py --model-path "$(model 8b)" --batches 1,64 --no-hf \
             --output "$OUT/step-8b.json" 2>&1 | tee "$OUT/step-8b.log" | tail -8 ;;
  qwen3)   python3 bench/gpu_step.py --model-path "$(model qwen3-8b)" --batches 1,64 --no-hf \
             --output "$OUT/step-qwen3-8b.json" 2>&1 | tee "$OUT/step-qwen3-8b.log" | tail -8 ;;
  families) for s in gemma3-1b gemma2-2b glm4-9b; do
             python3 bench/gpu_step.py --model-path "$(model $s)" --batches 1,64 --no-hf \
               --output "$OUT/step-$s.json" 2>&1 | tee "$OUT/step-$s.log" | tail -4
           done ;;
  fp8)     for s in 8b 1.1b; do for q in none:auto fp8:auto none:fp8 fp8:fp8; do
             w=${q%%:*}; kv=${q##*:}
             python3 bench/gpu_step.py --model-path "$(model $s)" --batches 1,64 --no-hf --quantization $w \
               --kv-dtype $kv --output "$OUT/step-$s-w$w-kv$kv.json" 2>&1 | tee "$OUT/step-$s-w$w-kv$kv.log" | tail -2
           done; done ;;
  gptoss)  python3 bench/gpu_step.py --model-path "$(model gpt-oss-20b)" --batches 1,64 --no-hf --profile \
             --output "$OUT/step-gpt-oss-20b.json" 2>&1 | tee "$OUT/step-gpt-oss-20b.log" | tail -8 ;;
  moe)     python3 bench/gpu_step.py --model-path "$(model qwen3-a3b-24l)" --batches 1,16,64 --no-hf --profile \
             --output "$OUT/step-qwen3-a3b-24l.json" 2>&1 | tee "$OUT/step-qwen3-a3b-24l.log" | tail -8
           python3 bench/gpu_step.py --model-path "$(model qwen3-a3b-24l)" --batches 1,16,64 --no-hf \
             --quantization fp8 --output "$OUT/step-qwen3-a3b-24l-fp8.json" 2>&1 | tee "$OUT/step-qwen3-a3b-24l-fp8.log" | tail -4 ;;
  spec)    python3 bench/draft_rows.py --model "$(model 1.1b)" --device cuda --dtype bfloat16 --batch 1,4,16 \
             --drafts 0,1,2,4 --context 512 --output "$OUT/draft-rows.json" 2>&1 | tee "$OUT/draft-rows.log" | tail -12 ;;
  mixed)   python3 bench/mixed_step.py --model "$(model 1.1b)" --decode 32 --context 512 --chunk 16,64,128,224 \
             --start 0,512,1536 --output "$OUT/mixed-step.json" 2>&1 | tee "$OUT/mixed-step.log" | tail -12 ;;
  mla)     python3 bench/mla_kernels.py --output "$OUT/mla-kernels.json" 2>&1 | tee "$OUT/mla-kernels.log" | tail -14 ;;
  deepseek) p=$(model deepseek-v2-lite)
           python3 bench/gpu_step.py --model-path "$p" --batches 1,16,64 --no-hf --profile \
             --output "$OUT/step-deepseek-v2-lite.json" 2>&1 | tee "$OUT/step-deepseek-v2-lite.log" | tail -8
           python3 bench/gpu_step.py --model-path "$p" --batches 1,64 --no-hf --kv-dtype fp8 \
             --output "$OUT/step-deepseek-v2-lite-kv8.json" 2>&1 | tee "$OUT/step-deepseek-v2-lite-kv8.log" | tail -4 ;;
  issue10) p=$(model 1.1b)
           for run in aggregated:true disaggregated:true aggregated:false; do
             m=${run%%:*}; OVERLAP=${run##*:}
             python3 bench/engine.py --config "$(yaml "$p" $m)" --concurrency 64 --prompt-tokens 64 --max-tokens 512 \
               --output "$OUT/serve64-$m-overlap-$OVERLAP.json" 2>&1 | tee "$OUT/serve64-$m-overlap-$OVERLAP.log" \
               | grep -E "serving|bare|loop per|no moment"
           done
           unset OVERLAP
           python3 bench/step_host.py --model-path "$p" --batch 64 --stagger --seconds 0.3 \
             --profile "$OUT/host-b64-profile.txt" 2>&1 | tail -1 | tee "$OUT/host.log"
           grep -A 25 "by device time" "$OUT/host-b64-profile.txt" ;;
  serve)   p=$(model 1.1b)
           for m in aggregated disaggregated; do
             python3 bench/engine.py --config "$(yaml "$p" $m)" --concurrency 1,16,64 --prompt-tokens 64 \
               --max-tokens 512 --output "$OUT/serve-$m${OVERLAP:+-overlap-$OVERLAP}.json" 2>&1 | tee "$OUT/serve-$m${OVERLAP:+-overlap-$OVERLAP}.log" | grep -E "serving|bare|loop per|no moment"
           done
           python3 bench/router_path.py --full --streams 64 --tokens 1000 --workers 1 --step-ms 2 \
             --output "$OUT/router-full.json" 2>&1 | tee "$OUT/router-full.log" | grep "streams over" ;;
  host)    p=$(model 1.1b)
           for b in 16 64; do for o in "" --no-overlap; do
             python3 bench/step_host.py --model-path "$p" --batch $b $o --output "$OUT/host-b$b$o.json" 2>&1 | tail -1
           done; done | tee "$OUT/host.log"
           python3 bench/step_host.py --model-path "$p" --batch 64 --temperature 0.8 --top-p 0.95 \
             --output "$OUT/host-b64-drawn.json" 2>&1 | tail -1 | tee -a "$OUT/host.log"
           python3 bench/step_host.py --model-path "$p" --batch 64 --stagger \
             --output "$OUT/host-b64-stagger.json" 2>&1 | tail -1 | tee -a "$OUT/host.log"
           python3 bench/step_host.py --model-path "$p" --batch 64 --penalized 1 \
             --output "$OUT/host-b64-penalized.json" 2>&1 | tail -1 | tee -a "$OUT/host.log"
           python3 bench/step_host.py --model-path "$p" --batch 64 --guided 8 \
             --output "$OUT/host-b64-guided.json" 2>&1 | tail -1 | tee -a "$OUT/host.log"
           python3 bench/step_host.py --model-path "$p" --batch 64 --seconds 0.3 --profile "$OUT/host-b64-profile.txt" \
             2>&1 | tail -1 | tee -a "$OUT/host.log"
           grep -A 25 "by device time" "$OUT/host-b64-profile.txt" ;;
  handoff) python3 bench/handoff.py --config deploy/1gpu.yaml --model-path "$(model 1.1b)" --backends ipc,nccl \
             --prompt-tokens 1000 --output "$OUT/handoff-1.1b.json" 2>&1 | tee "$OUT/handoff.log" | tail -8
           python3 bench/handoff.py --config deploy/1gpu.yaml --model-path "$(model 1.1b)" --backends ipc,nccl \
             --prompt-tokens 16 --runs 15 --output "$OUT/handoff-protocol.json" 2>&1 | tee -a "$OUT/handoff.log" | grep median
           for r in 1 2; do for o in on off; do  # TTFT with the prompt sent beside its reservation, and not
             f=""; [ $o = on ] && f=--overlap-reserve
             python3 bench/handoff.py --config deploy/1gpu.yaml --model-path "$(model 1.1b)" --backends ipc \
               --prompt-tokens 16 --runs 15 $f --output "$OUT/handoff-overlap-reserve-$o-$r.json" 2>&1 | tail -1
           done; done | tee -a "$OUT/handoff.log"
           python3 bench/ipc_lifetime.py --gib 4 --output "$OUT/ipc-lifetime.json" 2>&1 | tee "$OUT/ipc-lifetime.log" | tail -3 ;;
  sampler) python3 bench/sampler.py --device cuda --vocab 32000,128256 --batch 1,64 \
             --output "$OUT/sampler.json" 2>&1 | tee "$OUT/sampler.log" | tail -6 ;;
  *) echo "unknown check $1" >&2; exit 2 ;;
esac
