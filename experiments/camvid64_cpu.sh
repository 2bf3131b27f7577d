#!/usr/bin/env bash
# The CPU-sized CamVid experiment of docs/results.md, start to finish:
#   CAMVID=path/to/CamVid bash experiments/camvid64_cpu.sh
# 1. prepare CamVid at 64x64; 2. pretrain an ADM (32 base channels) on the unlabelled training
# images; 3. two-stage eDALD, MaxHerding alone and Random, 3 seeds each, 10 rounds, b = 0.1 N;
# 4. the summary table (runs/camvid64/summary.md).
# Two runs go at a time, one thread each (two cores; more threads per run only contend).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CAMVID=${CAMVID:-../shared/data/camvid}
STEPS=${STEPS:-1500}
export OMP_NUM_THREADS=1
[ -f data/camvid64/meta.json ] || $BIN/sparseseg prepare camvid --src "$CAMVID" --out data/camvid64 --size 64
$BIN/sparseseg pretrain --images data/camvid64/train/images --out checkpoints/adm_camvid64_c32.pt \
    --size 64 --channels 32 --steps "$STEPS" --batch-size 8 --lr 2e-4 --checkpoint-every 100
mkdir -p runs/camvid64
# the slow eDALD runs first, so the two lanes finish together
# (--set paths are relative to the working directory, paths in the config file to the file)
printf '%s\n' "two_stage_edald 0" "two_stage_edald 1" "two_stage_edald 2" "max_herding 0" "max_herding 1" \
    "max_herding 2" "random 0" "random 1" "random 2" |
    xargs -P 2 -L 1 sh -c '$0 run configs/camvid64_cpu.yaml --set strategy.name=$1 --set seed=$2 \
        --set out=runs/camvid64/$1_s$2 > runs/camvid64/$1_s$2.log 2>&1' "$BIN/sparseseg"
$BIN/sparseseg summarize runs/camvid64/*_s? --out runs/camvid64/summary.md
