#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with popserve, its client and test tools.
# On the reference CPU machine pip resolves torch 2.14.1 + torchvision 0.29.1 from local wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.popserve-install
want="$(cat pyproject.toml clients/python/pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]" -e clients/python
  echo "$want" > "$stamp"
fi
