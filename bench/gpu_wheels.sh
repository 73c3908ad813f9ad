#!/usr/bin/env bash
# Prepare, on a machine with pip access, what bench/gpu_check.sh installs on the GPU machine
# (which reaches no registry): a trimmed FlashInfer 0.7.2 (attention sources and headers only;
# the full wheel alone is over the device tool's 64 MiB limit) and apache-tvm-ffi, in .gpu/.
# .gpu/ is ignored through .git/info/exclude and travels with carry=[".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu /tmp/dkv_gpu_dl
PY=${PY:-.venv/bin/python}
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d /tmp/dkv_gpu_dl flashinfer-python==0.7.2 apache-tvm-ffi==0.1.11
cp /tmp/dkv_gpu_dl/apache_tvm_ffi-*.whl .gpu/
work=/tmp/dkv_gpu_fi && rm -rf $work && mkdir -p $work
unzip -q /tmp/dkv_gpu_dl/flashinfer_python-0.7.2-*.whl -d $work
fi=$work/flashinfer
rm -rf "$fi"/experimental "$fi"/fused_moe "$fi"/moe_ep "$fi"/data/cccl/{benchmarks,ci,docs,python,cudax} "$fi"/data/cutlass/{python,tools,examples,test,media,docs}
find "$fi"/data/csrc -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
find "$fi"/data/csrc -maxdepth 1 -type f \( -name '*.cu' -o -name '*.jinja' \) \
    ! -name 'batch_decode*' ! -name 'batch_prefill*' ! -name 'single_*' ! -name 'cascade*' ! -name 'page*' -delete
tar -C $work -cJf .gpu/flashinfer-0.7.2-trimmed.tar.xz flashinfer flashinfer_python-0.7.2.dist-info
du -sh .gpu/*
