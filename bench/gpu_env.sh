# Sourced by the GPU-node scripts (bench/gpu_serve.sh, bench/gpu_engine.sh): the node has torch but
# no registry, so the packages it lacks travel with the call, and the project runs from this checkout.
#   .gw/site.tar.xz  Ray Serve, transformers and the rest, for Python 3.12 (bench/gpu_bundle.sh)
#   .whl/*.whl       or single wheels (the first GPU session carried transformers and regex so)
if [ -f .gw/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .gw/site.tar.xz || exit 1
  export PYTHONPATH=/tmp/site
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The project's packages without installing it (pyproject maps models/ and service/ into popserve.).
mkdir -p /tmp/pp/popserve
ln -sfn "$PWD/models" /tmp/pp/popserve/models
ln -sfn "$PWD/service" /tmp/pp/popserve/service
export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
