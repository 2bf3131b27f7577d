#!/usr/bin/env bash
# The ScribbleGen experiment of docs/results.md on CamVid at 64x64, start to finish, on CPU:
#   CAMVID=path/to/CamVid bash experiments/camvid64_scribblegen.sh
# Needs the prepared data and the pretrained ADM of experiments/camvid64_cpu.sh (steps 1-2 there).
# 1. simulated scribbles on the training masks (one-pixel strokes at this size, half of each
#    region's skeleton); 2. the scribble-conditioned ADM, started from the unconditional ADM;
# 3. one synthetic dataset per lambda (w = 2); 4. real scribbles only vs fixed, uniform and
#    adaptive lambda and append, 3 seeds, features of the same ADM (configs/camvid64_cpu.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs/camvid64_scribblegen}
STEPS=${STEPS:-2000}
export OMP_NUM_THREADS=1
$BIN/sparseseg scribbles simulate data/camvid64 --out "$OUT/scribbles" --width 1 --length 0.5 --min-area 8 --seed 0
$BIN/sparseseg scribblegen train --images data/camvid64/train/images --scribbles "$OUT/scribbles" \
    --out "$OUT/gen.pt" --steps "$STEPS" --batch-size 8 --checkpoint-every 250 --samples 6 \
    --init checkpoints/adm_camvid64_c32.pt
$BIN/sparseseg scribblegen generate --checkpoint "$OUT/gen.pt" --images data/camvid64/train/images \
    --scribbles "$OUT/scribbles" --out "$OUT/synthetic" --lambdas 0.3,0.6,1.0 --guidance 2 --steps 20
$BIN/sparseseg scribblegen compare configs/camvid64_cpu.yaml --scribbles "$OUT/scribbles" \
    --synthetic "$OUT/synthetic/lambda_0.30,$OUT/synthetic/lambda_0.60,$OUT/synthetic/lambda_1.00" \
    --seeds 0,1,2 --out "$OUT/compare" --pixels-per-image 128 --set head.epochs=40 --set features.cache_gb=8
