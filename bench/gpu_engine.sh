#!/usr/bin/env bash
# Issue 9's GPU check in one call on a lent GPU node, on a Qwen3-VL of 8B shape with random bf16
# weights built there: bench/step_profile.py (one prefill / decode step, wall against kernel time),
# then bench/engine.py (popserve's stages in one process, POP on and off, concurrent clients).
# bench/gpu_env.sh brings what the node lacks. Results go to $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
source bench/gpu_env.sh
python3 bench/step_profile.py --shape 8b --device cuda --cache /tmp/popserve-ckpt --out "$out/step-profile-8b-cuda.md" \
  2>&1 | tee "$out/step-profile-8b-cuda.log"
python3 bench/engine.py --shape 8b --device cuda --cache /tmp/popserve-ckpt --out "$out/engine-8b-cuda" "$@" 2>&1 \
  | tee "$out/engine-8b-cuda.log"
