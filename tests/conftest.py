"""Shared fixtures: tiny checkpoints of both families, built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen3-vl", "gemma3")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from popserve.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, "tiny", root / f) for f in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_dir(request, tiny_dirs):
    """Parametrizes a test over both families."""
    return tiny_dirs[request.param]


@pytest.fixture(scope="session")
def qwen_dir(tiny_dirs):
    return tiny_dirs["qwen3-vl"]


@pytest.fixture(scope="session")
def gemma_dir(tiny_dirs):
    return tiny_dirs["gemma3"]
