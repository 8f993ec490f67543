"""The one configuration model of popserve.

The same pydantic model validates `popserve serve` flags, YAML files and the `args` of a
KubeRay serveConfigV2 application, so every way of starting the server agrees on what is valid.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Family = Literal["qwen3-vl", "gemma3"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class DeploymentSettings(_Strict):
    """Per-stage Serve settings. Fractional num_gpus lets all stages share one GPU pool."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[Autoscaling] = None  # when set, overrides num_replicas
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(256, ge=-1)  # beyond it callers get 503 at once; -1: unbounded
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=8)
    # torch intra-op threads of each replica; None: every core of the node. Stages that run at the
    # same time on one CPU pool must not oversubscribe it (docs/performance.md).
    torch_threads: Optional[int] = Field(None, ge=1)
    # How the replica's OpenMP threads wait between parallel regions. None: passive (they sleep at
    # once and yield the core to other stages). N: they spin N iterations first (libgomp's
    # GOMP_SPINCOUNT, about 50 ns each on the bench host), which saves the wake-up of every
    # region: on 2 cores 3000 cut a 448x448 image's TTFT at one client by 5-10% and cost 5-10% of
    # the throughput at 16 clients (docs/performance.md). For latency-bound, lightly loaded replicas.
    omp_spin_count: Optional[int] = Field(None, ge=0, le=10**8)
    # CPU priority of the stage's replicas: every thread at this Linux
    # nice (below 15 needs CAP_SYS_NICE). None: as Ray starts a worker (its Python threads at 15,
    # its C++ threads at 0). A trade on shared cores, so off by default: decode at 19 steps in what
    # encoding and prefill leave; on 2 cores, images at 16 clients: TTFT 0.87x, tok/s 1.00x, TPOT
    # 1.20x; at one client no change. Decode at 0 (above the others) cost a fifth of the tok/s.
    nice: Optional[int] = Field(None, ge=0, le=19)
    # How long a replica that is stopping (scale-down, upgrade, shutdown) may finish its requests.
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        if v == 0:  # Serve refuses it at deploy time, long after the config was accepted
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1")
        return v


# Stage defaults that differ from DeploymentSettings' own. A stage given in part (`decode:
# {num_replicas: 2}`) keeps the rest of them, as prefill_full given in part keeps prefill's.
STAGE_DEFAULTS: dict[str, dict] = {
    # The Ingress's torch work is the image processor's (torchvision ops): one thread. It and
    # decode drain their streams when stopped: a 2048-token answer takes tens of seconds.
    "ingress": {"max_ongoing_requests": 256, "torch_threads": 1, "graceful_shutdown_timeout_s": 60.0},
    # Decode runs one thread: its small matmuls lose more to thread barriers than they gain
    # (bench: 86 ms/step at 1 thread vs 98 at 2, batch 1), and the other core stays free for prefill.
    "decode": {"max_ongoing_requests": 128, "torch_threads": 1, "graceful_shutdown_timeout_s": 60.0},
}


class Limits(_Strict):
    max_request_bytes: int = Field(20 * 2**20, ge=1024)
    max_images_per_request: int = Field(4, ge=0)
    max_image_bytes: int = Field(10 * 2**20, ge=1024)
    # Images above this many pixels are downscaled (aspect kept) before encoding;
    # images whose header claims more than max_decoded_pixels are refused before decoding.
    max_image_pixels: int = Field(1024 * 1024, ge=64 * 64)
    max_decoded_pixels: int = Field(40_000_000, ge=64 * 64)
    max_prompt_tokens: Optional[int] = Field(None, ge=2)  # None: the model's context length
    max_tokens_default: int = Field(256, ge=1)
    max_tokens_limit: int = Field(2048, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)


class DecodeEngine(_Strict):
    """Continuous-batching limits of one decode replica."""

    max_running_seqs: int = Field(16, ge=1)
    max_seq_len: int = Field(4096, ge=16)  # prompt + generated tokens of one sequence
    max_waiting: int = Field(64, ge=0)  # admitted but not yet running; beyond it: 503
    # Tokens per streamed message after the first (vLLM's --stream-interval). Each message costs the
    # Ingress and Serve's proxy about what a token did: 4 halved their CPU per token at one client and
    # gave the image load at 8 clients 7% more tok/s, but tokens arrive in bursts (docs/performance.md).
    stream_interval: int = Field(1, ge=1, le=64)
    # On a GPU, replay each decode step from a CUDA graph (one per batch / width bucket, captured at
    # start): on an H200 an eager step of the 8B shape took 72-130 ms (2,158 kernel launches), its
    # graph 9-11 ms (docs/performance.md). Ignored on CPUs.
    cuda_graphs: bool = True


class Media(_Strict):
    allow_remote_images: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)  # empty + allow_remote: any public host
    fetch_timeout_s: float = Field(10.0, gt=0)
    max_redirects: int = Field(3, ge=0)


class ServeConfig(_Strict):
    model: Optional[str] = None  # directory or hub id; None: the offline default model
    served_model_name: Optional[str] = None
    family: Optional[Family] = None  # detected from config.json when omitted
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    pop_ratio: float = Field(1 / 3, ge=0.0, lt=1.0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    protect_metrics: bool = False  # /health stays open for probes; /metrics optionally keyed
    encoder_cache_bytes: int = Field(256 * 2**20, ge=0)
    # Each prefill replica keeps recent prompts' KV by 32-token block (on its device) and prefills
    # only what a new prompt does not share with them: a system prompt, an earlier turn, the same
    # image. 0 turns it off. models/prefix_cache.py.
    prefix_cache_bytes: int = Field(2**30, ge=0)
    # Zero-copy reads of torch tensors from Ray's shared-memory object store (CPU path): off, a
    # 2048-token handoff is pickled and copied on both sides; TTFT 1.15x (bench/results/zero-copy.md).
    zero_copy_tensors: bool = True
    # How a KV handoff computed on a GPU reaches a decode replica on the same node and GPU: cuda_ipc
    # maps the prefill's GPU memory (Ray Direct Transport); host goes through Ray's object store in
    # host memory (always so across GPUs or nodes). service/handoff.py.
    gpu_handoff: Literal["cuda_ipc", "host"] = "cuda_ipc"
    # A second prefill deployment at ratio 0 serves requests with "pop": false (A/B checks).
    pop_off_prefill: bool = True
    # Prompt tokens one prefill batch may hold (a longer prompt runs alone). Small batches release
    # their KV early: with a count limit, 8 prompts of 2048 tokens all waited for one 47 s batch.
    prefill_batch_tokens: int = Field(4096, ge=1)
    # What a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset gets:
    # "model": the values the checkpoint's generation_config.json sets (vLLM's default,
    # `--generation-config auto`), OpenAI's for the rest; "openai": OpenAI's (temperature 1, top_p 1).
    sampling_defaults: Literal["model", "openai"] = "model"

    ingress: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(**STAGE_DEFAULTS["ingress"]))
    encoder: DeploymentSettings = Field(default_factory=DeploymentSettings)
    prefill: DeploymentSettings = Field(default_factory=DeploymentSettings)
    prefill_full: Optional[DeploymentSettings] = None  # None: the same settings as prefill
    decode: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(**STAGE_DEFAULTS["decode"]))
    engine: DecodeEngine = Field(default_factory=DecodeEngine)
    limits: Limits = Field(default_factory=Limits)
    media: Media = Field(default_factory=Media)

    @model_validator(mode="before")
    @classmethod
    def _stages_given_in_part(cls, data: Any) -> Any:
        """Per-stage settings given as a mapping fill in over that stage's defaults, not the
        class's: `decode: {nice: 19}` must not also move decode to every core."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for stage, defaults in STAGE_DEFAULTS.items():
            if isinstance(data.get(stage), dict):
                data[stage] = {**defaults, **data[stage]}
        prefill = data.get("prefill")
        if isinstance(data.get("prefill_full"), dict):
            base = prefill.model_dump() if isinstance(prefill, DeploymentSettings) else (prefill or {})
            data["prefill_full"] = {**base, **data["prefill_full"]}
        return data

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k for k in (s.strip() for s in v.split(",")) if k]
        return v

    # ---- helpers -------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data)

    def resolved(self) -> "ServeConfig":
        """Fill model (default), family (from config.json) and device (from the hardware)."""
        from popserve.models.checkpoint import default_model_dir, detect_family

        cfg = self.model_copy(deep=True)
        if cfg.model is None:
            cfg.model = str(default_model_dir())
        if cfg.family is None:
            cfg.family = detect_family(cfg.model)
        if cfg.device == "auto":
            import torch

            from popserve.models.loading import unusable_gpu

            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
            if cfg.device == "cpu" and (why := unusable_gpu(torch.version.cuda)):
                logging.getLogger("popserve").warning("device auto: serving on the CPU: %s", why)
        if cfg.served_model_name is None:
            cfg.served_model_name = Path(cfg.model).name if Path(cfg.model).exists() else cfg.model
        return cfg

    def stage(self, name: str) -> DeploymentSettings:
        """A stage's settings by field name; prefill_full mirrors prefill unless set."""
        return (self.prefill_full or self.prefill) if name == "prefill_full" else getattr(self, name)

    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).name if self.model else "popserve-default")


def dump_json_schema() -> str:
    return json.dumps(ServeConfig.model_json_schema(), indent=2)
