"""The KV handoff: what a prefill replica sends a decode replica.

All L layers' K/V for the N-1 prefilled tokens live in ONE contiguous tensor, so the handoff moves
as one buffer (one object in Ray's store, one CUDA IPC handle, one NCCL send). The rest is the small
metadata that decode needs, and a fingerprint of model and POP config so that a decoder serving
another model or another pruning ratio refuses the handoff instead of decoding garbage.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch


class HandoffMismatch(ValueError):
    """A handoff was produced by another model or POP configuration."""


def pop_fingerprint(model_fingerprint: str, skipped_layers: int) -> str:
    return hashlib.sha256(f"{model_fingerprint}:k={skipped_layers}".encode()).hexdigest()[:16]


@dataclass
class KVHandoff:
    kv: torch.Tensor  # [L, 2 (K, V), kv_heads, T, head_dim], contiguous
    last_token: int  # t_N: the boundary token decode runs through the full model first
    rope_delta: int  # mRoPE: a token at cache index i sits at position i + rope_delta
    pop_ratio: float
    skipped_layers: int
    fingerprint: str  # pop_fingerprint(model, k)
    prompt_tokens: int  # N (the handoff holds N-1 of them)
    created_at: float = 0.0  # wall clock when prefill finished, to time the handoff
    cached_tokens: int = 0  # of the N-1, how many came from the prefill's prefix cache
    prompt_ids: Optional[torch.Tensor] = None  # t_1..t_N, for repetition_penalty (counts the prompt)

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def check(self, accepted: dict[str, int], num_layers: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype) -> None:
        """Raise HandoffMismatch unless this decoder can consume the handoff."""
        if self.fingerprint not in accepted:
            raise HandoffMismatch(
                f"KV handoff from another model or POP config (fingerprint {self.fingerprint}, "
                f"pop_ratio {self.pop_ratio:.3f}, k={self.skipped_layers}); this decoder accepts "
                f"k in {sorted(set(accepted.values()))} of its own model"
            )
        want = (num_layers, 2, kv_heads, self.num_tokens, head_dim)
        if tuple(self.kv.shape) != want or self.kv.dtype != dtype:
            raise HandoffMismatch(f"KV handoff shape {tuple(self.kv.shape)} {self.kv.dtype}, expected {want} {dtype}")
