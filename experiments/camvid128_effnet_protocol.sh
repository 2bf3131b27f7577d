#!/usr/bin/env bash
# Do the picks beat random clicks? (docs/results.md, "Against random clicks: the paired protocol")
# CamVid at 128x128, EfficientNet-Lite0 at input 256, b = 37, 10 rounds.
#   1. validation: settings chosen on 20% of the training images carved off by val_seed
#      (eval_split=val; the runs never see the test split);
#   2. test: the chosen settings, run once on the test split, 5 paired seeds, with and without
#      superpixel expansion.
# DATA: a folder from `sparseseg prepare camvid --size 128`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${DATA:-../data/camvid128}
OUT=${OUT:-runs/camvid128_protocol}
export OMP_NUM_THREADS=1
common=(--set "data=$DATA" --set budget=37 --set preview_images=1 --set backbone.input_size=256 --jobs 2)

# 1. validation split (3 seeds for random and MaxHerding, 2 for the two-stage strategies)
$BIN/sparseseg compare configs/camvid128_effnet.yaml --strategies random,max_herding,two_stage_ebald,two_stage_margin \
    --seeds 0,1,2 --out "$OUT/val" --set eval_split=val "${common[@]}"

# 2. test split, once per final setting
$BIN/sparseseg compare configs/camvid128_effnet.yaml --strategies random,two_stage_ebald --seeds 0,1,2,3,4 \
    --out "$OUT/test_none" --set eval_split=test "${common[@]}"
$BIN/sparseseg compare configs/camvid128_effnet.yaml --strategies two_stage_ebald,random --seeds 0,1,2,3,4 \
    --out "$OUT/test_superpixel" --set eval_split=test --set expansion=superpixel "${common[@]}"
