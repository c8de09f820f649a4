#!/usr/bin/env bash
# Tiny Shakespeare, character level, nanoGPT's CPU shape (4 layers, 4 heads, 128 dims, context 64,
# batch 12, 2000 iterations, no dropout): ternary vs its FP twin, each at its best LR of the sweep,
# plus the widest FP model that fits in the ternary model's packed bytes. Validation loss is over
# the whole validation split. Results: runs/bench-shakespeare/compare.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
LRS=${LRS:-2e-3,4e-3}
SCHEDULE=${SCHEDULE:-two-stage}   # the run recorded on 2026-11-23 used SCHEDULE=cosine
.venv/bin/python -m tritlm compare --preset tiny --max-steps 2000 --batch-size 12 --block-size 64 \
  --lrs "$LRS" --equal-bytes --threads "${THREADS:-1}" --eval-interval 250 --quiet \
  --set optim.schedule="$SCHEDULE" --set optim.wd_schedule="$([ "$SCHEDULE" = two-stage ] && echo two-stage || echo constant)" \
  --set ckpt_interval=2000 --set tensorboard=false --out "${OUT:-runs/bench-shakespeare}" "$@"
