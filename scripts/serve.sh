#!/usr/bin/env bash
# Install (if needed) and serve: a local Ray cluster is started for you; with no --model the
# offline default model is served. Extra arguments go to `popserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/popserve serve "$@"
