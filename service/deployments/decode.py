"""Decode deployment: full-depth model, continuous batching, tokens streamed back."""
from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from popserve.models.decoder import FullDecoder
from popserve.models.kv import KVHandoff
from popserve.models.prompt import PromptBuilder
from popserve.models.sampling import SamplingParams

from ..config import ServeConfig
from ..engine.scheduler import DecodeScheduler
from .common import replica_info, setup_replica


@serve.deployment
class DecodeStage:
    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        setup_replica(self.cfg, self.cfg.decode)
        eng = self.cfg.engine
        decoder = FullDecoder(self.cfg.model, self.cfg.pop_ratio, self.cfg.dtype, self.cfg.device,
                              max_seqs=eng.max_running_seqs, max_seq_len=eng.max_seq_len)
        stop_ids = PromptBuilder(self.cfg.model).eos_token_ids
        self.scheduler = DecodeScheduler(decoder, stop_ids, eng.max_waiting, eng.stream_interval)

    async def generate(self, handoff: KVHandoff, params: dict) -> AsyncIterator[list]:
        async for items in self.scheduler.generate(handoff, SamplingParams(**params)):
            yield items

    def stats(self) -> dict:  # "pid": operators (and tests) can tell replicas apart
        return {**self.scheduler.stats(), "param_bytes": self.scheduler.decoder.param_bytes(), **replica_info()}

    def ready(self) -> bool:
        return True
