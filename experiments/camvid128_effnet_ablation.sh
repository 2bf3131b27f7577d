#!/usr/bin/env bash
# What the EfficientNet-Lite0 features need (docs/results.md): MaxHerding alone on
# configs/camvid128_effnet.yaml with one change each: finer maps (input 256 for 128x128 data,
# seeds 0-2), the deep stages only (strides 16, 32; seed 0), the shallow stages only (strides 2, 4,
# 8; seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs/camvid128_effnet_ablation}
export OMP_NUM_THREADS=1
run() {  # NAME SEEDS OVERRIDE...
    local name=$1 seeds=$2; shift 2
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    $BIN/sparseseg compare configs/camvid128_effnet.yaml --strategies max_herding --seeds "$seeds" \
        --out "$OUT/$name" "${sets[@]}"
}
run input256 0,1,2 backbone.input_size=256
run deep 0 'backbone.blocks=[4,6]'
run shallow 0 'backbone.blocks=[0,1,2]'
