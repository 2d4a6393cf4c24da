#!/usr/bin/env bash
# The GPU check of issue 19: on a machine with an NVIDIA GPU, build cellswarm with the
# `cuda` backend, time the reference U-Net there (`cellswarm bench train`), train the
# HeLa model for 2 minutes on the GPU and segment its held-out frames 15-19, printing the
# numbers for docs/benchmarks.md.
#
#   scripts/gpu-check.sh [DATA_DIR] [DEVICE]
#
# DATA_DIR holds Fluo-N2DL-HeLa/02 (default: ../shared/data, as in CI); DEVICE is
# cuda:0 unless given (wgpu:0 works the same with `FEATURE=wgpu`; `FEATURE=none` and
# DEVICE cpu run the whole script on the CPU, as a dry run). The bench also runs with
# `--device cpu` for the ratio, in the same session. Everything it writes goes under
# $OUT (default: a new temporary folder). It stops at the first failure.
#
# The first `--features cuda` build downloads an LLVM bundle (tracel-llvm-bundler, a
# build dependency of burn's cuda backend) into ~/.local/share/tracel: the machine needs
# to reach GitHub once, or that folder copied from a machine that built it.
set -euo pipefail

data=${1:-../shared/data}
device=${2:-cuda:0}
feature=${FEATURE:-cuda}
out=${OUT:-$(mktemp -d -t cellswarm-gpu-check.XXXXXX)}
hela="$data/Fluo-N2DL-HeLa/02"

if [ ! -d "$hela" ]; then
    echo "gpu-check: no HeLa movie at $hela (give the data folder as the first argument)" >&2
    exit 2
fi
if [ "$feature" = cuda ] && ! command -v nvidia-smi >/dev/null; then
    echo "gpu-check: no nvidia-smi on this machine: it needs an NVIDIA GPU and its driver" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== build (features: $feature)"
if [ "$feature" = none ]; then
    cargo build --release -p cellswarm-node
else
    cargo build --release -p cellswarm-node --features "$feature"
fi
bin=${CARGO_TARGET_DIR:-target}/release/cellswarm

echo "== bench train, $device and cpu"
"$bin" bench train --device "$device" | tail -1 | sed "s/^/$device: /"
"$bin" bench train --device cpu | tail -1 | sed 's/^/cpu: /'

echo "== train HeLa frames 0-14 for 2 minutes on $device"
start=$(date +%s)
"$bin" train --device "$device" --data "$hela" --frames 0-14 --val-frames 15-19 \
    --minutes 2 --out "$out/model" 2>&1 | grep -v " INFO " | tail -5
echo "train wall time: $(( $(date +%s) - start )) s"

echo "== segment HeLa frames 15-19 on $device and score them"
start=$(date +%s)
"$bin" segment --device "$device" --model "$out/model" --movie "$hela" --frames 15-19 \
    --exclude-border true --out "$out/masks" 2>&1 | grep -v " INFO " || true
echo "segment wall time: $(( $(date +%s) - start )) s"
"$bin" eval --pred "$out/masks" --gt "$data/Fluo-N2DL-HeLa/02_ERR_SEG"
echo "gpu-check: done; files in $out"
