"""Prefix cache of a prefill replica: prompt KV kept by block, reused by later prompts.

vLLM's automatic prefix caching, for POP's handoff KV. A prompt's t_1..t_{N-1} is cut into blocks
of BLOCK_TOKENS; block i is keyed by a hash chain over the request's cache salt (if any) and every
token (and every image, by content digest) up to its end. So a key names the whole prefix before
it, and equal keys mean equal KV: token KV is causal, and Gemma-3's bidirectional image tokens only
see their own image, whose digest is in the key of every block it touches. A later prompt that
starts with the same blocks prefills only the rest. POP's KV differs from a full prefill's, so a
cache belongs to one prefill runner.

Bounded in bytes, least recently used first. A hit refreshes its blocks last to first, so a
prefix's head outlives its tail: eviction never strands a tail block whose head is gone.
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

BLOCK_TOKENS = 32


@dataclass
class ImageSpan:
    """An image's placeholder tokens [start, end) in the prompt, and its content digest."""

    start: int
    end: int
    key: Optional[str]  # None: unknown content, so nothing from `start` on can be cached


def block_keys(input_ids: torch.Tensor, images: Sequence[ImageSpan], salt: Optional[str] = None) -> list[bytes]:
    """One key per full block of input_ids (the tokens to prefill), each naming all before it
    and the request's cache salt: prompts with other salts share nothing."""
    ids = input_ids.to("cpu", torch.int64).numpy()
    stop = len(ids)
    for im in images:
        if im.key is None:
            stop = min(stop, im.start)
    keys, parent = [], hashlib.blake2b(salt.encode(), digest_size=16).digest() if salt else b""
    for start in range(0, stop - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        end = start + BLOCK_TOKENS
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(ids[start:end].tobytes())
        for im in images:
            if im.start < end and im.end > start:
                h.update(im.key.encode())
        parent = h.digest()
        keys.append(parent)
    return keys


def shared_blocks_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens at the start of a and b that are equal, in whole blocks: what b can reuse of a."""
    n = min(len(a), len(b))
    return int((a[:n] == b[:n]).cumprod(0).sum()) // BLOCK_TOKENS * BLOCK_TOKENS


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.queried_tokens = self.hit_tokens = 0  # over lookups, as vLLM counts its hit rate

    def lookup(self, keys: list[bytes], limit: int) -> tuple[int, Optional[torch.Tensor]]:
        """The longest cached run of leading blocks, at most `limit` tokens: (tokens, KV
        [L, 2, kv_heads, tokens, head_dim] or None)."""
        self.queried_tokens += limit
        hit = self._leading(keys, limit)
        for key, _ in reversed(hit):
            self.blocks.move_to_end(key)
        if not hit:
            return 0, None
        self.hit_tokens += len(hit) * BLOCK_TOKENS
        return len(hit) * BLOCK_TOKENS, torch.cat([kv for _, kv in hit], dim=3)

    def peek(self, keys: list[bytes], limit: int) -> int:
        """How many tokens lookup would find now; counts no hit and refreshes nothing."""
        return len(self._leading(keys, limit)) * BLOCK_TOKENS

    def _leading(self, keys: list[bytes], limit: int) -> list[tuple[bytes, torch.Tensor]]:
        hit = []
        for key in keys[: limit // BLOCK_TOKENS]:
            kv = self.blocks.get(key)
            if kv is None:
                break
            hit.append((key, kv))
        return hit

    def insert(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """Keep the blocks of kv [L, 2, kv_heads, T, head_dim] that keys name (the first
        len(keys) blocks of the prompt), copied out of kv so that it is not pinned."""
        for i in reversed(range(min(len(keys), kv.shape[3] // BLOCK_TOKENS))):
            if keys[i] in self.blocks:
                self.blocks.move_to_end(keys[i])
                continue
            block = kv[:, :, :, i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS].clone()
            size = block.numel() * block.element_size()
            if size > self.max_bytes:
                return
            self.blocks[keys[i]] = block
            self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        return {"prefix_cache_queried_tokens": self.queried_tokens, "prefix_cache_hit_tokens": self.hit_tokens,
                "prefix_cache_bytes": self.bytes, "prefix_cache_blocks": len(self.blocks)}
