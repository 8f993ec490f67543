"""Decode deployment: full-depth model, continuous batching, tokens streamed back."""
from __future__ import annotations

from typing import AsyncIterator, Optional

import torch
from ray import serve

from popserve.models.decoder import FullDecoder
from popserve.models.families.base import ImageFeatures
from popserve.models.kv import KVHandoff
from popserve.models.prompt import PromptBuilder
from popserve.models.sampling import SamplingParams

from ..config import ServeConfig
from ..engine.scheduler import DecodeScheduler
from ..errors import retry_replica_failures
from ..handoff import gpu_location, receive
from ..metrics import StageMetrics
from .common import replica_info, setup_replica


@serve.deployment
class DecodeStage:
    def __init__(self, cfg: dict, prefill, prefill_full=None):
        self.cfg = ServeConfig.model_validate(cfg)
        self.prefill = {True: prefill, False: prefill_full}  # by the request's "pop"
        setup_replica(self.cfg, self.cfg.decode)
        eng = self.cfg.engine
        decoder = FullDecoder(self.cfg.model, self.cfg.pop_ratio, self.cfg.dtype, self.cfg.device,
                              max_seqs=eng.max_running_seqs, max_seq_len=eng.max_seq_len,
                              cuda_graphs=eng.cuda_graphs)
        builder = PromptBuilder(self.cfg.model)
        self.scheduler = DecodeScheduler(decoder, builder.eos_token_ids, eng.max_waiting, eng.stream_interval,
                                         builder.tokenizer)
        self.metrics = StageMetrics("decode", self.scheduler.stats)
        self.location = gpu_location()  # prefill replicas on this GPU hand KV over by CUDA IPC

    async def generate(self, input_ids: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor],
                       features: Optional[list[ImageFeatures]], params: dict, pop: bool = True,
                       cache_salt: Optional[str] = None, n: int = 1, stop: tuple[str, ...] = ()) -> AsyncIterator[list]:
        # Decode asks for the prefill itself, so that the KV handoff is this replica's object in
        # Ray's store and is freed as soon as the KV is in the pool. Handed in by the Ingress, it
        # would stay pinned as an argument of this stream until its last token: a second copy of
        # every running prompt's KV in the store (tests/test_service.py, the handoff's lifetime).
        handoff = self._prefill(pop, cache_salt, input_ids, mm_token_type_ids, features)  # awaited by the scheduler
        async for items in self.scheduler.generate(handoff, SamplingParams(**params), n, stop):
            yield items

    async def _prefill(self, pop: bool, cache_salt: Optional[str], *args) -> KVHandoff:
        """The request's KV handoff. A prefill replica that dies is asked again (on another replica)
        here, so the request keeps its place in decode instead of being relaunched whole."""
        # A handoff that will wait for a slot comes through host memory, so that waiting requests
        # hold no GPU memory; one that gets a slot at once may stay on the GPU (service/handoff.py).
        deliver_to = None if self.scheduler.slots_spoken_for() else self.location

        async def attempt():
            return await receive(await self.prefill[pop].prefill.remote(*args, deliver_to=deliver_to,
                                                                        cache_salt=cache_salt))

        return await retry_replica_failures(attempt, "prefill")

    def stats(self) -> dict:  # "pid": operators (and tests) can tell replicas apart
        return {**self.scheduler.stats(), "param_bytes": self.scheduler.decoder.param_bytes(), **replica_info()}

    def ready(self) -> bool:
        return True
