"""What every stage replica shares: process setup and Serve options from the config."""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..config import DeploymentSettings, ServeConfig

logger = logging.getLogger("ray.serve")


def setup_replica(cfg: ServeConfig, stage: DeploymentSettings) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1" if cfg.model and os.path.isdir(cfg.model) else "0")
    # Ray pins OMP_NUM_THREADS to an actor's num_cpus (1 when 0): a prefill replica would use one
    # core. Default to every core; the stage's torch_threads partitions a node between replicas.
    torch.set_num_threads(stage.torch_threads or available_cores())
    set_nice(stage.nice)


def available_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup v2 CPU quota (a
    container's CPU limit). os.cpu_count() counts the node's, 200 in a pod limited to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # a partial core counts as one
    except (OSError, ValueError):  # no cgroup v2 file here (cgroup v1, macOS): affinity only
        pass
    return cores


def set_nice(nice: Optional[int]) -> None:
    """Every thread of this process at `nice` (None: as Ray started them): Linux keeps a nice value
    per thread, and Ray's threads already run. Threads started later inherit their creator's."""
    if nice is None:
        return
    tasks, denied = "/proc/self/task", 0
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
        except PermissionError:  # a nice below the thread's own needs CAP_SYS_NICE
            denied += 1
    if denied:
        logger.warning("nice %d: %d threads kept a higher nice (lowering it needs CAP_SYS_NICE)", nice, denied)


def replica_info() -> dict:
    """Which process this is and the thread layout it really runs with (for operators and tests)."""
    import torch

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_spin_count": os.environ.get("GOMP_SPINCOUNT"),
            "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "nice": os.getpriority(os.PRIO_PROCESS, 0)}


# glibc hands large freed blocks back to the OS, so every prefill page-faulted its activations in
# again (100-155k minor faults per 2048-token prompt). Keeping them: in-server prefill busy time
# 4.10 s vs 4.35-4.52 s per 2048-token prompt, alternating A/B on 2 cores (docs/performance.md).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
              "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


def deployment_options(name: str, s: DeploymentSettings, cfg: ServeConfig) -> dict:
    # Stages share the node's cores. OpenMP's default spin-waiting makes replicas that run at once
    # steal each other's cores: measured on 2 cores, a decode step took 2.2 s instead of 0.2 s
    # next to a running prefill. Passive waiting yields the core (docs/performance.md).
    # omp_spin_count: libgomp spins that long at a barrier, then sleeps (no wait policy set).
    omp = {"OMP_WAIT_POLICY": "PASSIVE"} if s.omp_spin_count is None else {"GOMP_SPINCOUNT": str(s.omp_spin_count)}
    env = {"TOKENIZERS_PARALLELISM": "false", **omp, **MALLOC_ENV}
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
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
    }
    if s.autoscaling:
        opts["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        opts["num_replicas"] = s.num_replicas
    return opts
