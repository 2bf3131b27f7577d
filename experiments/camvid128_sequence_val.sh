#!/usr/bin/env bash
# Settings chosen on a sequence-disjoint validation split (docs/results.md): the training images of
# CamVid sequence 0006R0 (101) are held out and evaluated on, the pool is the other 266 (sequences
# 0001TP and 0016E5), so no validation image is a neighbouring frame of a pool image.
# CamVid at 128x128, EfficientNet-Lite0 at input 256, b = 37, 10 rounds, seeds 0-2:
#   1. Random against two-stage eBALD without expansion (does this split agree with the test split?);
#   2. two-stage eBALD with superpixel regions at three amounts of region supervision: R region pixels
#      drawn per click sharing weight w, with w / R (one region pixel's weight) fixed at 1/32.
# DATA: a folder from `sparseseg prepare camvid --size 128`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DATA=${DATA:-../data/camvid128}
OUT=${OUT:-runs/camvid128_sequence_val}
export OMP_NUM_THREADS=1
common=(--seeds 0,1,2 --jobs 3 --set "data=$DATA" --set eval_split=val --set "val_prefixes=[0006R0]"
        --set budget=37 --set preview_images=1 --set backbone.input_size=256)

$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --strategies random,two_stage_ebald --out "$OUT/none"
for rw in 32:1 128:4 512:16; do
    $BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --strategies two_stage_ebald \
        --set expansion=superpixel --set "superpixel.max_region_pixels=${rw%:*}" --set "superpixel.region_weight=${rw#*:}" \
        --out "$OUT/superpixel_r${rw%:*}"
done
