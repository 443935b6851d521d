#!/usr/bin/env bash
# Fetch (or build) exactly the wheels of bench/gpu_wheels.txt into .whl/ for the bare GPU machine
# (Python 3.12 x86_64, glibc 2.39 (Ubuntu 24.04), no network); the device tool carries .whl/ (its `carry`, 64 MiB with the tree).
#   bash bench/gpu_wheels.sh            # run here, where pip reaches the registry; prints the total size
# 'build' lines are built from their sdist with this venv's torch (pure-Python wheels: DeepSpeed
# JIT-builds its CUDA ops with nvcc on the GPU machine); the others are downloaded as cp312 manylinux
# or universal wheels. Needs: this repo's venv active (torch installed, for the DeepSpeed build).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${WHL:-$ROOT/.whl}
LIST=$ROOT/bench/gpu_wheels.txt
PY=${PY:-python}
mkdir -p "$DEST"
shopt -s nocaseglob  # wheel names keep the project's capitals (Brotli-...)
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
PLAT=(--platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
while read -r spec how _; do
  [[ -z "$spec" || "$spec" == \#* ]] && continue
  name=${spec%%==*}
  norm=$(echo "$name" | tr '-' '_')
  if compgen -G "$DEST/${norm}-${spec##*==}-*.whl" >/dev/null; then echo "have $spec"; continue; fi
  if [[ "$how" == build ]]; then
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"
  else
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" -d "$DEST" "$spec"
  fi
  echo "got  $spec"
done <"$LIST"
n=$(grep -cv '^\s*\(#\|$\)' "$LIST")
whls=("$DEST"/*.whl)
have=${#whls[@]}
[[ "$have" == "$n" ]] || { echo "error: $DEST holds $have wheels, $LIST names $n: remove the stale ones" >&2; exit 1; }
stat -c '%s %n' "$DEST"/*.whl | awk '{printf "%9.2f MiB  %s\n", $1/2^20, $2; s+=$1} END {printf "%9.2f MiB  total (the device tool carries at most 64 MiB with the tree)\n", s/2^20}'
