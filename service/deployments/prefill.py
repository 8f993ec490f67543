"""Prefill deployment: POP-pruned prefill of concurrent prompts, batched, one KV handoff each."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import torch
from ray import serve

from popserve.models.families import ImageFeatures
from popserve.models.kv import KVHandoff
from popserve.models.prefill import PrefillRequest, PrunedPrefill

from ..config import ServeConfig
from ..errors import BadRequest
from ..handoff import Location, send
from ..metrics import StageMetrics
from .common import replica_info, setup_replica

MAX_PAD_RATIO = 1.5  # prompts batch together only when the longest is at most this x the shortest


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices grouped so that right-padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= MAX_PAD_RATIO * max(1, lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@serve.deployment
class PrefillStage:
    def __init__(self, cfg: dict, pop_ratio: float, stage: str = "prefill"):
        self.cfg = ServeConfig.model_validate(cfg)
        setup_replica(self.cfg, self.cfg.stage(stage))
        self.runner = PrunedPrefill(self.cfg.model, pop_ratio, self.cfg.dtype, self.cfg.device,
                                    self.cfg.prefix_cache_bytes)
        # Serve's batcher limits a batch's prompt tokens (batch_size_fn below), not its count.
        self._batched.set_max_batch_size(self.cfg.prefill_batch_tokens)
        self.prompts = self.batches = self.tokens = self.in_flight = 0
        self.handoff_bytes = 0
        self.busy_s = 0.0
        self.largest_batch = (0, 0)  # (budgeted tokens, prompts) of the biggest batch so far
        self.metrics = StageMetrics(stage, self.stats)

    async def prefill(self, input_ids: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor],
                      features: Optional[list[ImageFeatures]] = None,
                      deliver_to: Optional[Location] = None, cache_salt: Optional[str] = None) -> KVHandoff:
        """The prompt's KV handoff, for the decode replica at `deliver_to` (service/handoff.py)."""
        features = features or []
        image_tokens = int((input_ids == self.runner.family.image_token_id).sum())
        if image_tokens != sum(f.num_tokens for f in features):
            raise BadRequest(f"prompt has {image_tokens} image tokens but {len(features)} images give "
                             f"{sum(f.num_tokens for f in features)} features", code="image_token_mismatch")
        self.in_flight += 1
        try:
            request = PrefillRequest(input_ids, mm_token_type_ids, features, cache_salt)
            # A prompt counts the tokens it will compute, not those the prefix cache holds; one
            # longer than the budget counts as the whole budget: it runs alone.
            tokens = max(1, input_ids.numel() - self.runner.cached_tokens(request))
            handoff = await self._batched(min(tokens, self.cfg.prefill_batch_tokens), request)
            return await send(handoff, deliver_to if self.cfg.gpu_handoff == "cuda_ipc" else None)
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=sum)
    async def _batched(self, tokens: list[int], requests: list[PrefillRequest]) -> list[KVHandoff]:
        t0 = time.perf_counter()
        out: list[Optional[KVHandoff]] = [None] * len(requests)
        for group in length_groups([r.input_ids.numel() for r in requests]):
            handoffs = await asyncio.to_thread(self.runner.prefill, [requests[i] for i in group])
            for i, h in zip(group, handoffs):
                out[i] = h
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.prompts += len(requests)
        self.tokens += sum(h.num_tokens - h.cached_tokens for h in out)  # computed, not taken from the cache
        self.largest_batch = max(self.largest_batch, (sum(tokens), len(requests)))
        self.handoff_bytes += sum(h.nbytes for h in out)
        return out

    def stats(self) -> dict:  # "pid": operators (and tests) can tell replicas apart
        r = self.runner
        return {"prompts": self.prompts, "batches": self.batches, "tokens": self.tokens,
                "busy_seconds": self.busy_s, "in_flight": self.in_flight, "handoff_bytes": self.handoff_bytes,
                "batch_token_budget": self.cfg.prefill_batch_tokens, "largest_batch_tokens": self.largest_batch[0],
                "largest_batch_prompts": self.largest_batch[1],
                "skipped_layers": r.k, "num_layers": r.family.num_layers, "pop_ratio": r.pop_ratio,
                "param_bytes": r.param_bytes(), **r.cache_stats(), **replica_info()}

    def held_parameter_names(self) -> list[str]:
        """For tests and operators: which weights this replica really holds."""
        return [n for n, _ in self.runner.text.named_parameters()]

    def ready(self) -> bool:
        return True
