#!/usr/bin/env bash
# Issue 9's GPU check in one call on a lent GPU node, on a Qwen3-VL of 8B shape with random bf16
# weights built there: bench/step_profile.py (one prefill / decode step, wall against kernel time),
# then bench/engine.py (popserve's stages in one process, POP on and off, concurrent clients).
# The node has torch but no registry and no Ray: a .whl/ folder, when present, brings the
# transformers of the project's range (and the regex it needs). Results go to $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The project's packages without installing it (pyproject maps models/ and service/ into popserve.).
mkdir -p /tmp/pp/popserve
ln -sfn "$PWD/models" /tmp/pp/popserve/models
ln -sfn "$PWD/service" /tmp/pp/popserve/service
export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/step_profile.py --shape 8b --device cuda --cache /tmp/popserve-ckpt --out "$out/step-profile-8b-cuda.md" \
  2>&1 | tee "$out/step-profile-8b-cuda.log"
python3 bench/engine.py --shape 8b --device cuda --cache /tmp/popserve-ckpt --out "$out/engine-8b-cuda" "$@" 2>&1 \
  | tee "$out/engine-8b-cuda.log"
