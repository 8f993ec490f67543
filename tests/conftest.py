"""Shared fixtures: tiny checkpoints of both families, built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen3-vl", "gemma3")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads in the test process and lose a lot to them
    on a busy 2-core machine (servers under test set their own torch_threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---- a real popserve on a real local Ray cluster, both families, one HTTP port ---------------
class Server:
    def __init__(self, family, base_url, model_name, model_dir, app_name):
        self.family, self.base_url, self.model_name = family, base_url, model_name
        self.model_dir, self.app_name = model_dir, app_name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config(model_dir, **overrides):
    """The config the test servers run: small limits so tests reach them quickly."""
    from popserve.service.config import ServeConfig

    base = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "torch_threads": 1,
            "engine": {"max_running_seqs": 16, "max_seq_len": 1024, "max_waiting": 64},
            "limits": {"max_tokens_limit": 256, "max_images_per_request": 3}}
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return ServeConfig.model_validate(base)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def deploy(port: int, app_name: str, cfg, timeout: float = 300.0) -> str:
    """serve.run the real app builder under /<app_name>; wait for /health; return its base URL."""
    import time

    import httpx
    from ray import serve

    from popserve.service.app import build_app

    serve.run(build_app(cfg), name=app_name, route_prefix=f"/{app_name}", blocking=False)
    base = f"http://127.0.0.1:{port}/{app_name}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{app_name} did not become healthy")


@pytest.fixture(scope="session")
def servers(ray_cluster, tiny_dirs):
    out = {}
    for fam, d in tiny_dirs.items():
        cfg = test_config(d)
        out[fam] = Server(fam, deploy(ray_cluster, fam, cfg), cfg.model_name(), d, fam)
    return out


@pytest.fixture(scope="session", params=FAMILIES)
def server(request, servers):
    return servers[request.param]


@pytest.fixture(scope="session")
def popserve_url(servers):
    return servers["qwen3-vl"].base_url


@pytest.fixture(scope="session")
def popserve_model_name(servers):
    return servers["qwen3-vl"].model_name
