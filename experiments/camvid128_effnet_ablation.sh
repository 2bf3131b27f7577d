#!/usr/bin/env bash
# What the EfficientNet-Lite0 features need (docs/results.md): MaxHerding alone, seed 0, on
# configs/camvid128_effnet.yaml with one change each: finer maps (input 256 for 128x128 data),
# the deep stages only (strides 16, 32), the shallow stages only (strides 2, 4, 8).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs/camvid128_effnet_ablation}
export OMP_NUM_THREADS=1
run() {  # NAME OVERRIDE...
    local name=$1; shift
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    $BIN/sparseseg compare configs/camvid128_effnet.yaml --strategies max_herding --seeds 0 \
        --out "$OUT/$name" "${sets[@]}"
}
run input256 backbone.input_size=256
run deep 'backbone.blocks=[4,6]'
run shallow 'backbone.blocks=[0,1,2]'
