#!/usr/bin/env bash
# The one GPU session of issue 30 (one H100 or H200, fresh and bare: Python 3.12, PyTorch 2.11 + CUDA 13, nvcc,
# no network; at most 540 s in one call). docs/gpu.md says how to run it and what each step measures.
#   bash bench/gpu_wheels.sh                      # here, first: the carried wheels into .whl/ (15 MiB)
#   bash bench/gpu_session.sh                     # there: device tool, carry [".whl"]
#   bash bench/gpu_session.sh --rehearse          # here, CPU: every step at a tiny shape (tests/test_gpu_rehearsal.py)
# Steps, each under its own time budget (and the session's deadline), each writing $OUT/<step>.txt as it
# goes; a step that fails or runs out of time does not stop the next. $OUT/summary.txt: one line a step.
#   0 setup     install .whl/ (GPU) or put the import guard in place (rehearsal: bench/gpu_guard), versions
#   1 tests     pytest -m gpu tests/test_gpu.py (rehearsal: every test reported skipped, no CUDA)
#   2 train     bench/gpu_train.py: trainer, ZeRO-3, NCCL, bf16, demo data, kill -9 + exact resume, both timers
#   3 gpu_step  bench/gpu_step.py: 7B width, 4 layers, 4096 positions, 8 images; ckpt or not; flex vs SDPA
#   4 scale016b bench/scale_016b.py --one-device: 0.16B + U-Net patching, 4096 positions, step/data/MFU, both timers
# Environment: OUT (default ./gpu_out), PY (default python3), TOTAL (session seconds: 530 on the GPU, 3600 in the rehearsal),
# GPU_DATA (rehearsal: a demo data folder already built, for bench/gpu_train.py --data).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
MODE=gpu
if [[ "${1:-}" == --rehearse ]]; then MODE=rehearse; elif [[ -n "${1:-}" ]]; then
  echo "usage: bash bench/gpu_session.sh [--rehearse]" >&2; exit 2
fi
OUT=${OUT:-$ROOT/gpu_out}
PY=${PY:-python3}
# The rehearsal's budgets are only guards against a hang: a shared 2-core machine at load 20 took 80 s to
# import the trainer that takes 8 s of CPU.
TOTAL=${TOTAL:-$([[ $MODE == gpu ]] && echo 530 || echo 3600)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# step NAME BUDGET_S CMD...: run CMD under `timeout` for min(BUDGET_S, seconds left of TOTAL), output to
# $OUT/NAME.txt as it goes; one summary line (exit status 124 = out of time).
step() {
  local name=$1 budget=$2; shift 2
  local left=$((TOTAL - ($(date +%s) - START)))
  ((budget > left)) && budget=$left
  if ((budget < 5)); then
    echo "$name: not run, the session's ${TOTAL} s are spent" | tee -a "$SUMMARY"; return
  fi
  local t0; t0=$(date +%s)
  { echo "\$ $*"; echo "(budget ${budget} s, mode $MODE, $(date -u +%H:%M:%S) UTC)"; } >"$OUT/$name.txt"
  if declare -F "$1" >/dev/null; then set -- bash -c "$1"; fi  # a function of this script (exported below)
  timeout --kill-after=5 "$budget" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  local verdict=ok; ((rc == 124 || rc == 137)) && verdict="OUT OF TIME"; ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
  echo "$name: $verdict (exit $rc) in $(($(date +%s) - t0)) s of ${budget} s" | tee -a "$SUMMARY"
}

setup() {
  date -u
  if [[ $MODE == gpu ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
    nvcc --version | tail -2
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
    else
      echo "no .whl/ here: carry it (bash bench/gpu_wheels.sh, then the device tool's carry: [\".whl\"])"; return 1
    fi
  else
    echo "rehearsal on CPU: imports limited to the GPU image + bench/gpu_wheels.txt (bench/gpu_guard)"
    if compgen -G ".whl/*.whl" >/dev/null; then  # the wheels fetched here are exactly the list's
      local want have
      want=$(grep -v '^\s*\(#\|$\)' bench/gpu_wheels.txt | awk '{print $1}' | tr '[:upper:]-' '[:lower:]_' | sed 's/==/-/' | sort)
      have=$(for w in .whl/*.whl; do basename "$w"; done | awk -F- '{print $1"-"$2}' | tr '[:upper:]' '[:lower:]' | sort)
      [[ "$want" == "$have" ]] || { echo "error: .whl/ does not hold exactly bench/gpu_wheels.txt"; diff <(echo "$want") <(echo "$have"); return 1; }
      echo ".whl/ holds exactly bench/gpu_wheels.txt ($(du -ch .whl/*.whl | tail -1 | cut -f1))"
    fi
  fi
  "$PY" - <<'EOF'
import sys, torch, deepspeed, streaming, diffusers, sentencepiece, pydantic
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| deepspeed", deepspeed.__version__, "| streaming", streaming.__version__,
      "| diffusers", diffusers.__version__, "| sentencepiece", sentencepiece.__version__, "| pydantic", pydantic.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
import pretrain.train.loop, data_pipeline.loader, data_pipeline.demo_data  # the trainer's imports resolve
print("trainer imports ok")
EOF
}

if [[ $MODE == gpu ]]; then
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT/bench/gpu_guard:$ROOT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export MODE PY
export -f setup
step 0_setup "$([[ $MODE == gpu ]] && echo 40 || echo 400)" setup
if [[ $MODE == gpu ]]; then
  step 1_tests 110 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider --durations=12
  step 2_train 140 "$PY" bench/gpu_train.py --out "$WORK/train"
  step 3_gpu_step 140 "$PY" bench/gpu_step.py --layers 4 --rows 1 --images 8 --steps 8 --warmup 3 --attention flex,sdpa
  step 4_scale016b 120 "$PY" bench/scale_016b.py --one-device --steps 20 --timers events,sync --out "$WORK/scale"
else
  step 1_tests 400 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
  step 2_train 1200 "$PY" bench/gpu_train.py --rehearse --out "$WORK/train" ${GPU_DATA:+--data "$GPU_DATA"}
  step 3_gpu_step 600 "$PY" bench/gpu_step.py --tiny --steps 1 --warmup 1 --attention flex,sdpa
  step 4_scale016b 1200 "$PY" bench/scale_016b.py --one-device --steps 2 --images 1 --timers events,sync \
    --out "$WORK/scale" model.n_layers=1 model.dim=64 model.n_heads=2 "model.unet_channels=[16,32]"
fi
rm -rf "$WORK"
echo "session: $(($(date +%s) - START)) s; outputs in $OUT" | tee -a "$SUMMARY"
! grep -q "FAILED\|OUT OF TIME\|not run" "$SUMMARY"
