"""What every stage replica shares: process setup and Serve options from the config."""
from __future__ import annotations

import logging
import os

from ..config import DeploymentSettings, ServeConfig

logger = logging.getLogger("ray.serve")


def setup_replica(cfg: ServeConfig) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1" if cfg.model and os.path.isdir(cfg.model) else "0")
    # Ray pins OMP_NUM_THREADS to an actor's num_cpus (1 when 0): a prefill replica would use one
    # core. Default to every core; set torch_threads to partition a big node between replicas.
    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)


def deployment_options(name: str, s: DeploymentSettings, cfg: ServeConfig) -> dict:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.zero_copy_tensors:
        # Map torch tensors straight out of Ray's shared-memory store instead of copying them.
        env["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"
    opts = {
        "name": name,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        # Serve's own rejection past max_queued_requests (the HTTP proxy's, for the ingress) says when to retry.
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": {"env_vars": env}},
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if s.autoscaling:
        opts["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        opts["num_replicas"] = s.num_replicas
    return opts
