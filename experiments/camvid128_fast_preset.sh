#!/usr/bin/env bash
# The fast preset's local stage against the exact default, and two class-balance terms, on the
# validation split, and an ensemble of heads against MC dropout (docs/performance.md "A labelling
# round on the CPU"; docs/results.md).
# CamVid at 128x128, EfficientNet-Lite0 at input 256, two-stage eBALD, b = 37, 10 rounds, seeds 0-2.
# The config gives candidates_per_image: 1024, which a preset would not override: the candidates
# are set explicitly (2,048 is what strategy.preset=fast sets).
# DATA: a folder from `sparseseg prepare camvid --size 128`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${DATA:-../data/camvid128}
OUT=${OUT:-runs/camvid128_fast_preset}
export OMP_NUM_THREADS=1
common=(--strategies two_stage_ebald --seeds 0,1,2 --jobs 2 --set "data=$DATA" --set eval_split=val --set budget=37
        --set preview_images=1 --set backbone.input_size=256)

$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --out "$OUT/exact" --set strategy.candidates_per_image=10000
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --out "$OUT/fast" --set strategy.candidates_per_image=2048
# class-balance terms, each paired with the fast runs above
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --out "$OUT/fast_classweight" \
    --set strategy.candidates_per_image=2048 --set head.class_weighting=balanced
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --out "$OUT/fast_balance" \
    --set strategy.candidates_per_image=2048 --set strategy.balance=predicted
# an ensemble of 6 heads as eBALD's sample source, and Random with either head (the head's share of the gain)
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${common[@]}" --out "$OUT/fast_ensemble" \
    --set strategy.candidates_per_image=2048 --set head.dropout=0 --set head.ensemble=6
random=(--strategies random --seeds 0,1,2 --jobs 2 --set "data=$DATA" --set eval_split=val --set budget=37
        --set preview_images=1 --set backbone.input_size=256)
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${random[@]}" --out "$OUT/random_dropout"
$BIN/sparseseg compare configs/camvid128_effnet.yaml "${random[@]}" --out "$OUT/random_ensemble" \
    --set head.dropout=0 --set head.ensemble=6
