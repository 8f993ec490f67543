#!/usr/bin/env bash
# Train both SynthVQA models from scratch on CPU, evaluate POP on them, and install the better one
# as models/checkpoints/default (a copy, not a symlink). The two families train at the same time,
# one core each (one thread), so both finish in about 30 minutes on the 2-core reference machine.
#   bench/train_vlms.sh                # train + evaluate both families
#   SKIP_TRAIN=1 bench/train_vlms.sh   # only re-run the evaluations
# Each model trains in two stages (docs/trained-models.md): stage 1 (12 CPU-minutes) pretrains the
# vision tower on region labels, then trains on SynthVQA with the curriculum; stage 2 (17 CPU-minutes)
# continues from it on a fresh data stream with a warm restart of the learning rate.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
STAGE1_MINUTES=${STAGE1_MINUTES:-12}
STAGE2_MINUTES=${STAGE2_MINUTES:-17}
EVAL_N=${EVAL_N:-100}
IMPORTANCE_SAMPLES=${IMPORTANCE_SAMPLES:-32}
WORK=${WORK:-$(mktemp -d)}
mkdir -p bench/logs
pin() { if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
train() {  # family core
  local fam=$1 core=$2
  pin "$core" .venv/bin/popserve train --family "$fam" --out "$WORK/$fam-stage1" \
    --steps 1500 --max-minutes "$STAGE1_MINUTES" --heldout 0
  pin "$core" .venv/bin/popserve train --family "$fam" --out "models/checkpoints/$fam-shapes" \
    --init-from "$WORK/$fam-stage1" --data-seed 1 --steps 2000 --warmup 50 --max-minutes "$STAGE2_MINUTES" --heldout 200
}
if [[ -z "${SKIP_TRAIN:-}" ]]; then
  train qwen3-vl 0 > bench/logs/train-qwen3-vl.log 2>&1 &
  train gemma3 1 > bench/logs/train-gemma3.log 2>&1 &
  wait
  tail -n 2 bench/logs/train-*.log
fi
# The default model: the family with the higher held-out accuracy (full model).
best=$($PY - <<'PY'
import json
acc = {f: json.load(open(f"models/checkpoints/{f}-shapes/training.json")).get("heldout_accuracy", 0)
       for f in ("qwen3-vl", "gemma3")}
print(max(acc, key=acc.get))
PY
)
echo "default model: $best"
rm -rf models/checkpoints/default
cp -r "models/checkpoints/$best-shapes" models/checkpoints/default
for fam in qwen3-vl gemma3; do
  $PY bench/eval_trained.py --family "$fam" --n "$EVAL_N" --samples "$IMPORTANCE_SAMPLES" 2>&1 | tee "bench/logs/eval-$fam.log"
done
$PY bench/demo_request.py
