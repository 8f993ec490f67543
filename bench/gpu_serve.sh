#!/usr/bin/env bash
# Issue 9's GPU check, the server itself: one call on a lent GPU node (carry .gw from
# bench/gpu_bundle.sh). On a Qwen3-VL of 8B shape with random bf16 weights built there:
#   1. the tests that need a GPU (CUDA-graph decode steps against eager ones, tiny models)
#   2. bench/step_profile.py: one prefill / decode step, decode from CUDA graphs and eager
#   3. bench/peers.py's popserve part: the real server (Ray Serve, all stages sharing the GPU,
#      bench/gpu-8b.yaml) driven over HTTP, POP on and off, and its /metrics afterwards.
# Each part has its own time limit, so that one that hangs leaves the others' results.
# Results go to $OUT (or bench/results): at most 8 files come back from a device call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
exec > >(tee "$out/gpu-serve.log") 2>&1
source bench/gpu_env.sh
model=/tmp/popserve-ckpt/qwen3-vl-8b
t0=$SECONDS
echo "== GPU tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_models_decode_graphs.py
echo "== 8B checkpoint ($((SECONDS - t0)) s)"
[ -f "$model/config.json" ] || python3 -m popserve.service.cli make-tiny --family qwen3-vl --size 8b --device cuda "$model"
echo "== step profile ($((SECONDS - t0)) s)"
timeout 240 python3 bench/step_profile.py --model "$model" --device cuda --lengths ${LENGTHS:-512,2048} \
  --batches 1,16 --out "$out/step-profile-8b-h200.md"
echo "== server ($((SECONDS - t0)) s)"
timeout ${SERVE_LIMIT:-330} python3 bench/peers.py --model "$model" --peers popserve --serve-config bench/gpu-8b.yaml \
  --workloads ${WORKLOADS:-text2048,image448,text512} --concurrency ${CONCURRENCY:-1,16} --requests 8 \
  --out "$out/peers-8b-h200"
echo "== done ($((SECONDS - t0)) s)"
