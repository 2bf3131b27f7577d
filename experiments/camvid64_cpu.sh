#!/usr/bin/env bash
# The CPU-sized CamVid experiment of docs/results.md, start to finish:
#   CAMVID=path/to/CamVid bash experiments/camvid64_cpu.sh
# 1. prepare CamVid at 64x64; 2. pretrain an ADM (32 base channels) on the unlabelled training
# images; 3. nine strategies (single-stage, coverage alone, coverage first), 3 seeds each,
# 10 rounds, b = 0.1 N, with runs/camvid64/summary.md, summary.csv and curves.png.
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
# every strategy of the paper's Tables 1 and 2, 3 seeds, two one-thread runs at a time (resumable)
$BIN/sparseseg compare configs/camvid64_cpu.yaml --out runs/camvid64 --seeds 0,1,2 --jobs 2 --paper \
    --strategies random,entropy,margin,dald,edald,max_herding,two_stage_entropy,two_stage_margin,two_stage_edald
