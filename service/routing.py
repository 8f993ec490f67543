"""Prefix-affinity routing for prefill replicas: prompts that start alike go where their KV is cached.

Each prefill replica has its own prefix cache (models/prefix_cache.py). Serve's default router
picks replicas by load alone, so with R replicas a follow-up turn finds its conversation's KV only
1/R of the time. This router, on Serve's public request-router API, ranks the replicas by
rendezvous hashing of the prompt's first block of tokens, so every prompt that starts with the same
block (a system prompt, a conversation's earlier turns) goes to the same replica, and replicas that
come and go move only the prefixes they owned. It gives way to load: when the preferred replica has
SPILL_AFTER more requests than the least loaded one (or is full), the least loaded takes the
request, and caches the prefix too. Prompts shorter than a block, which the cache cannot help, are
routed as by Serve's default (power of two choices). Same-node replicas come first, as in Serve's
default router (LocalityMixin), which matters on GPUs, where a same-GPU handoff is a CUDA IPC map.

Ray Serve LLM's PrefixCacheAffinityRouter does this for text prompts, with a prefix tree actor; it
needs ray[llm] (pyarrow and more) and reads OpenAI request objects, while prefill replicas take
token ids, so this smaller router stands in for it.
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

import torch
from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter,
                                      RunningReplica)

from popserve.models.prefix_cache import BLOCK_TOKENS, block_keys

SPILL_AFTER = 4  # requests in flight beyond the least loaded replica's before a prefix moves on
ROUTER_CLASS = "popserve.service.routing:PrefixAffinityRouter"  # how Serve's config names it


def prefix_key(pending_request: Optional[PendingRequest]) -> Optional[bytes]:
    """The first block of the prompt a prefill call carries (its first argument) and its cache
    salt, or None when the call has none worth routing by (shorter than a block plus t_N, or not
    a prefill)."""
    ids = pending_request.args[0] if pending_request is not None and pending_request.args else None
    if not torch.is_tensor(ids) or ids.numel() <= BLOCK_TOKENS:
        return None
    return block_keys(ids[:BLOCK_TOKENS], [], pending_request.kwargs.get("cache_salt"))[0]


def rank(key: bytes, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Rendezvous (highest random weight) order of the replicas for this key."""
    return sorted(replicas, key=lambda r: hashlib.blake2b(key + r.replica_id.unique_id.encode(),
                                                          digest_size=8).digest(), reverse=True)


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        nearby = self.apply_locality_routing(pending_request)  # widens on each retry, as Serve's default
        replicas = [r for r in candidate_replicas if r.replica_id in nearby]
        key = prefix_key(pending_request)
        if key is None or len(replicas) < 2:
            return [random.sample(replicas, min(2, len(replicas)))]
        preferred = rank(key, replicas)[0]
        load = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in replicas}
        if load[preferred.replica_id] >= min(load.values()) + SPILL_AFTER:
            return [replicas]  # Serve takes the least loaded of them
        return [[preferred], replicas]  # the next rank when the preferred one is full
