#!/usr/bin/env bash
# Issue 9's GPU check, the server itself: one call on a lent GPU node (carry .gw from
# bench/gpu_bundle.sh). On a Qwen3-VL of 8B shape with random bf16 weights built there:
#   tests    the tests that need a GPU (CUDA-graph decode steps, the CUDA IPC handoff)
#   profile  bench/step_profile.py: one prefill / decode step, decode from CUDA graphs and eager
#   ab       bench/config_ab.py: the server with its GPU handoff by CUDA IPC against host memory
#   prefix   bench/config_ab.py: the prefix cache on against off, on prompts that share their start
#   serve    bench/peers.py's popserve part: the real server (Ray Serve, all stages sharing the
#            GPU, bench/gpu-8b.yaml) driven over HTTP, POP on and off, and its /metrics afterwards
#   sample   the server greedy and with real Qwen3-VL's default sampling (T 0.7, top_k 20, top_p
#            0.8) at its 151,936-token vocabulary, answers of a fixed length (ignore_eos) in both:
#            what the sampler costs a decode step on the GPU
# The checkout travels too, within the call's 64 MiB with the archive: move the tracked
# models/checkpoints (39 MB; nothing here needs them) aside for the call.
# PARTS picks them (default: tests,profile,serve). Each part has its own time limit, so that one
# that hangs leaves the others' results. Results go to $OUT (or bench/results); at most 8 files
# come back from a device call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
exec > >(tee "$out/gpu-serve.log") 2>&1
source bench/gpu_env.sh
parts=,${PARTS:-tests,profile,serve},
model=/tmp/popserve-ckpt/qwen3-vl-8b
t0=$SECONDS
if [[ $parts == *,tests,* ]]; then
  echo "== GPU tests"
  timeout 90 python3 -m pytest -q -s -p no:cacheprovider tests/test_models_decode_graphs.py tests/test_gpu_handoff.py \
    tests/test_models_prefix_cache.py::test_reuse_on_a_gpu_gives_the_kv_prefill_computes_there
  tests_rc=$?
fi
config=bench/gpu-8b.yaml
if [ "${tests_rc:-0}" != 0 ]; then  # serve anyway, through host memory, so the run still measures
  config=/tmp/gpu-8b-host.yaml
  { cat bench/gpu-8b.yaml; echo "gpu_handoff: host"; } > "$config"
  echo "GPU tests failed: serving with gpu_handoff: host"
fi
echo "== 8B checkpoint ($((SECONDS - t0)) s)"
[ -f "$model/config.json" ] || python3 -m popserve.service.cli make-tiny --family qwen3-vl --size 8b --device cuda "$model"
if [[ $parts == *,profile,* ]]; then
  echo "== step profile ($((SECONDS - t0)) s)"
  timeout 240 python3 bench/step_profile.py --model "$model" --device cuda --lengths 512,2048 --batches 1,16 \
    --out "$out/step-profile-8b-h200.md"
fi
if [[ $parts == *,ab,* ]]; then
  echo "== GPU handoff A/B ($((SECONDS - t0)) s)"
  timeout 200 python3 bench/config_ab.py --model "$model" --config "$config" --arm "" --arm gpu_handoff=host \
    --loads text2048:1:8,text2048:16:16,image448:1:8,image448:16:16,text512:16:16 --rounds 1 \
    --out "$out/handoff-ab-8b-h200.md"
fi
if [[ $parts == *,prefix,* ]]; then
  echo "== prefix cache A/B ($((SECONDS - t0)) s)"
  timeout 200 python3 bench/config_ab.py --model "$model" --config "$config" --arm "" --arm prefix_cache_bytes=0 \
    --loads shared1009:1:8,sameimage448:1:8,shared1009:16:16 --rounds 1 --out "$out/prefix-cache-ab-8b-h200.md"
fi
if [[ $parts == *,serve,* ]]; then
  echo "== server ($((SECONDS - t0)) s)"
  timeout 200 python3 bench/peers.py --model "$model" --peers popserve --serve-config "$config" \
    --workloads text2048,image448,text512 --concurrency 1,16 --requests 8 --out "$out/peers-8b-h200"
fi
if [[ $parts == *,sample,* ]]; then
  for how in greedy sampled; do
    echo "== server, $how ($((SECONDS - t0)) s)"
    body='{"temperature": 0, "ignore_eos": true}'
    [ $how = sampled ] && body='{"temperature": 0.7, "top_k": 20, "top_p": 0.8, "ignore_eos": true}'
    timeout 150 python3 bench/peers.py --model "$model" --peers popserve --serve-config "$config" \
      --workloads text512,image448 --concurrency 1,16 --requests 8 --max-tokens 64 \
      --body "$body" --out "$out/peers-8b-h200-$how"
  done
fi
echo "== done ($((SECONDS - t0)) s)"
