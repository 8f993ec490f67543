"""`popserve serve`: a local Ray cluster when none is running, the app on it, Ctrl-C to stop."""
from __future__ import annotations

import signal
import threading
import time

from .config import ServeConfig

APP_NAME = "popserve"


def start(cfg: ServeConfig, wait_ready_s: float = 600.0) -> None:
    """Start (or join) Ray, deploy the app and wait until /health would say ready."""
    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        # Joins the cluster named by RAY_ADDRESS or started with `ray start`; otherwise starts an
        # embedded local one that lives as long as this process.
        ray.init(logging_level="WARNING", include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + wait_ready_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status and status.status == "RUNNING":
            return
        if status and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"popserve failed to start: {status.message}")
        time.sleep(0.5)
    raise TimeoutError("popserve did not become ready in time")


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(cfg: ServeConfig) -> int:
    cfg = cfg.resolved()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"popserve: starting {cfg.model} ({cfg.family}, pop_ratio={cfg.pop_ratio:.3f}, device={cfg.device})",
          flush=True)
    start(cfg)
    print(f"popserve: serving {cfg.model_name()} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)", flush=True)
    stopping.wait()
    print("popserve: shutting down", flush=True)
    stop()
    return 0
