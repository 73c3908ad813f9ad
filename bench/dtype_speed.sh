#!/bin/bash
# `make serve`'s server in bfloat16 and in float32, twice each, on this CPU: SGLang's own load
# generator (sglang.benchmark.serving), 4 prompts of 2,048 token ids at once, 64 tokens each,
# prefix cache flushed first. About 10 minutes on 2 cores.  Usage: bash bench/dtype_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python MODEL=models/smollm2 PORT=${PORT:-30011}
lscpu | grep -E "Model name" || true
echo "bfloat16 instructions: $(grep -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for dtype in bfloat16 float32 bfloat16 float32; do
  $PY -m dkv_sglang.launch_server --model-path $MODEL --kv-policy dynamickv --kv-budget 128 --dtype $dtype \
      --max-total-tokens 65536 --host 127.0.0.1 --port "$PORT" --log-level warning > /tmp/dtype-speed-$dtype.log 2>&1 &
  pid=$!
  until curl -s "127.0.0.1:$PORT/health" >/dev/null; do kill -0 $pid || exit 1; sleep 2; done
  $PY -m sglang.benchmark.serving --backend sglang --base-url "http://127.0.0.1:$PORT" --model $MODEL \
      --tokenizer $MODEL --dataset-name random-ids --tokenize-prompt --random-input-len 2048 --random-output-len 64 \
      --random-range-ratio 1 --num-prompts 4 --request-rate inf --seed 1 --warmup-requests 1 --flush-cache --output-file /tmp/dtype-speed.jsonl 2>&1 \
    | grep -E "Benchmark duration|Input token throughput|Mean TTFT|Mean TPOT" | sed "s/^/$dtype: /"
  kill $pid; wait $pid 2>/dev/null || true
done
