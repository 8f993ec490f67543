#!/usr/bin/env bash
# Train both SynthVQA models from scratch on CPU (one thread each, one after the other), evaluate
# POP on them, and install the better one as models/checkpoints/default (a copy, not a symlink).
#   bench/train_vlms.sh            # train + eval both families (~2 x 15-25 min train, ~10 min eval each)
#   SKIP_TRAIN=1 bench/train_vlms.sh   # only re-run the evaluations
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
STEPS=${STEPS:-1000}
BATCH=${BATCH:-16}
MINUTES=${MINUTES:-14}   # CPU minutes of one core per model (the Gemma-3 checkpoint's recipe)
EVAL_N=${EVAL_N:-20}
IMPORTANCE_SAMPLES=${IMPORTANCE_SAMPLES:-24}
mkdir -p bench/logs
for fam in qwen3-vl gemma3; do
  if [[ -z "${SKIP_TRAIN:-}" ]]; then
    .venv/bin/popserve train --family "$fam" --out "models/checkpoints/$fam-shapes" \
      --steps "$STEPS" --batch-size "$BATCH" --max-minutes "$MINUTES" --heldout 200 2>&1 | tee "bench/logs/train-$fam.log"
  fi
done
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
