#!/usr/bin/env bash
# The FlashInfer path on one GPU (issue 6): correctness, decode speed vs SGLang-style FlashInfer,
# greedy equivalence. Writes $OUT/gpu_check.json (after every part) and $OUT/gpu_check.log.
#
# Here, once (needs pip access; ~10 MB lands in .gpu/, ignored via .git/info/exclude):
#     bench/gpu_wheels.sh
# Then one device call (the tool `run`):
#     command:   bash bench/gpu_check.sh
#     carry:     [".gpu"]
#     timeout_s: 540
# Budget: FlashInfer JIT-compiles its attention kernels on first use (nvcc, 16 cores; expect a few
# minutes, cached under $FLASHINFER_WORKSPACE_BASE for the rest of the run), then the checks take
# about a minute. Parts run in the order correctness, greedy, decode_speed; the JSON keeps what
# finished if the time runs out. To rerun one part only: `bash bench/gpu_check.sh decode_speed`.
# Do not run it without a GPU (DKV_GPU_CHECK_DRY=1 .venv/bin/python bench/gpu_check.py dry-runs the
# greedy part on CPU with the torch kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"; export OUT
SITE=/tmp/dkv_site; mkdir -p $SITE
if ! python3 -c "import flashinfer" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .gpu/apache_tvm_ffi-*.whl \
        && tar -C $SITE -xJf .gpu/flashinfer-0.7.2-trimmed.tar.xz \
        || { echo '{"error": "could not install the carried wheels: run bench/gpu_wheels.sh and carry .gpu"}' > "$OUT/gpu_check.json"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export FLASHINFER_WORKSPACE_BASE=/tmp/dkv_fi_cache MAX_JOBS=16 PYTHONUNBUFFERED=1
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
