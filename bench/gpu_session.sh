#!/usr/bin/env bash
# The one GPU session of issue 13 (an H200 for ~15 minutes): GPU-relevant tests, then the 7B-width
# step benchmark with and without activation checkpointing. Output goes to $OUT (or ./gpu_out).
#   bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python}
{
  date; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
# (1) model tests (flex vs SDPA equality, mask semantics, no host sync) on this machine
timeout 240 $PY -m pytest tests/test_model.py tests/test_estimate.py -q -x 2>&1 | tail -15 | tee "$OUT/tests.txt"
# (2) the step benchmark at the 7B width: 4 layers, 1 x 4096 positions with 8 images, bf16, flex
timeout 300 $PY bench/gpu_step.py --layers 4 --rows 1 --images 8 --steps 10 --warmup 3 2>&1 | grep -v WARN | tee "$OUT/gpu_step.txt"
timeout 200 $PY bench/gpu_step.py --layers 4 --rows 2 --images 8 --steps 10 --warmup 3 2>&1 | grep -v WARN | tee "$OUT/gpu_step_mb2.txt"
