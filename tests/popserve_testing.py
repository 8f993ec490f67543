"""Helpers for tests that run a real popserve on a real local Ray cluster (imported by conftest)."""
from __future__ import annotations


class Server:
    def __init__(self, family, base_url, model_name, model_dir, app_name):
        self.family, self.base_url, self.model_name = family, base_url, model_name
        self.model_dir, self.app_name = model_dir, app_name


# Tokens per streamed message of each family's session test server (engine.stream_interval):
# gemma3's sends 3 at a time so that the streaming tests cover the option as well as the default.
STREAM_INTERVAL = {"qwen3-vl": 1, "gemma3": 3}
ENCODER_OMP_SPIN = {"qwen3-vl": None, "gemma3": 1000}  # the gemma3 test server's encoder spins
# The gemma3 test server's decode yields the CPU, and its Ingress runs just below Ray's 15.
NICE = {"qwen3-vl": {}, "gemma3": {"Decode": 19, "Ingress": 16}}
# The qwen3-vl test server's Ingress runs its image processor on 2 threads (Ray alone would give it 1).
INGRESS_TORCH_THREADS = {"qwen3-vl": 2, "gemma3": 1}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(model_dir, **overrides):
    """The config the test servers run: small limits so tests reach them quickly."""
    from popserve.service.config import ServeConfig

    one = {"torch_threads": 1}  # tests share a busy 2-core machine
    base = {"model": str(model_dir), "dtype": "float32", "device": "cpu",
            "encoder": one, "prefill": one, "decode": one,
            "engine": {"max_running_seqs": 16, "max_seq_len": 1024, "max_waiting": 64},
            "prefill_batch_tokens": 256,  # small: test_concurrent_requests_match_solo fills several batches
            "limits": {"max_tokens_limit": 256, "max_images_per_request": 3}}
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return ServeConfig.model_validate(base)


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




# ---- /metrics -----------------------------------------------------------------------------------
def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum over replicas of the samples `name` (as exposed, e.g. ray_popserve_requests_total)
    whose labels include `labels`; KeyError when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if not found:
        raise KeyError(f"{name}{labels or ''} not in /metrics")
    return sum(found)


def wait_for_metric(fetch, name: str, ok, timeout: float = 30.0, **labels: str) -> str:
    """Poll fetch() (the /metrics text) until ok(metric_value(...)) holds; returns that text.
    Replicas export every second and Ray's agent collects every second in the test cluster."""
    import time

    deadline, value = time.monotonic() + timeout, None
    while True:
        text = fetch()
        try:
            value = metric_value(text, name, **labels)
            if ok(value):
                return text
        except KeyError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels or ''} = {value} after {timeout} s")
        time.sleep(0.25)
