#!/usr/bin/env bash
# Train both SynthVQA models from scratch on CPU, evaluate POP on them, and install the better one
# as models/checkpoints/default (a copy, not a symlink). Each model trains data parallel on both
# cores (two processes, one per core, gradients averaged every step), one family after the other:
# under 30 minutes each on the 2-core reference machine (about an hour for both).
#   bench/train_vlms.sh                # train + evaluate both families
#   SKIP_TRAIN=1 bench/train_vlms.sh   # only re-run the evaluations
# One run per model (docs/trained-models.md): vision pretraining on region labels, then SynthVQA
# with the curriculum and hard-kind sampling, in a budget of TRAIN_MINUTES of CPU time per process.
set -euo pipefail
cd "$(dirname "$0")/.."
# nproc honours OMP_NUM_THREADS, so count the cores without it.
PROCS=${PROCS:-$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) >= 2 ? 2 : 1 ))}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=.venv/bin/python
TRAIN_MINUTES=${TRAIN_MINUTES:-26}
EVAL_N=${EVAL_N:-100}
IMPORTANCE_SAMPLES=${IMPORTANCE_SAMPLES:-32}
mkdir -p bench/logs
train() {  # family
  .venv/bin/popserve train --family "$1" --out "models/checkpoints/$1-shapes" --procs "$PROCS" \
    --steps 6000 --max-minutes "$TRAIN_MINUTES" --heldout 200
}
if [[ -z "${SKIP_TRAIN:-}" ]]; then
  train qwen3-vl > bench/logs/train-qwen3-vl.log 2>&1
  train gemma3 > bench/logs/train-gemma3.log 2>&1
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
