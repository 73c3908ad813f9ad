# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY := .venv/bin/python
MODEL := models/smollm2
PORT ?= 30000
BUDGET ?= 128

.PHONY: setup serve test test-fast lint clean

setup:
	bash runtime/setup.sh

# DynamicKV on the default real small model, laptop-class CPU defaults.
serve: setup
	$(PY) -m dkv_sglang.launch_server --model-path $(MODEL) --kv-policy dynamickv --kv-budget $(BUDGET) \
		--dtype bfloat16 --max-total-tokens 65536 --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest tests -q

# The pure-Python tests only (no engine): seconds.
test-fast: setup
	$(PY) -m pytest tests -q -m "not engine"

clean:
	rm -rf .venv models
