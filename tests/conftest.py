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


from popserve_testing import ENCODER_OMP_SPIN, INGRESS_TORCH_THREADS, NICE, STREAM_INTERVAL, Server, deploy, free_port, server_config  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    # Metrics reach the node's agent every second (Ray's default: 10 s), so /metrics shows a
    # request's numbers soon after it: tests poll for them (popserve_testing.wait_for_metric).
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def servers(ray_cluster, tiny_dirs):
    out = {}
    for fam, d in tiny_dirs.items():
        cfg = server_config(d, engine={"stream_interval": STREAM_INTERVAL[fam]},
                            encoder={"omp_spin_count": ENCODER_OMP_SPIN[fam]},
                            decode={"nice": NICE[fam].get("Decode")},
                            ingress={"nice": NICE[fam].get("Ingress"), "torch_threads": INGRESS_TORCH_THREADS[fam]})
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
