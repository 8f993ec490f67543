"""The KV handoff: what a prefill replica sends a decode replica.

All L layers' K/V for the prefilled tokens live in ONE contiguous buffer, so the handoff moves as
one buffer (one object in Ray's store, one CUDA IPC handle, one NCCL send). Each layer keeps only
what decode's pool for it keeps: every one of the N-1 prompt tokens for full attention, the last
window of them for a sliding-window layer (Gemma-3: 5 of every 6 layers). Layers of one type lie
together, as in decode's pools, so that admission copies each type in one go. The rest is the
small metadata that decode needs, and a fingerprint of model and POP config so that a decoder
serving another model or another pruning ratio refuses the handoff instead of decoding garbage.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# The buffer's layout: per layer type, in order of first appearance, (its layers, the prompt's last
# tokens each of them keeps); within a group, [layers, 2 (K, V), kv_heads, kept, head_dim].
Groups = tuple[tuple[tuple[int, ...], int], ...]


class HandoffMismatch(ValueError):
    """A handoff was produced by another model or POP configuration."""


def pop_fingerprint(model_fingerprint: str, skipped_layers: int) -> str:
    return hashlib.sha256(f"{model_fingerprint}:k={skipped_layers}".encode()).hexdigest()[:16]


def layer_groups(layer_types: Sequence[str], windows: Sequence[Optional[int]], tokens: int) -> Groups:
    """The handoff layout for `tokens` prefilled tokens: each type's layers, and how many of the
    last tokens their attention still reaches (all of them, or a sliding window's worth)."""
    groups: dict[str, tuple[list[int], int]] = {}
    for i, (t, w) in enumerate(zip(layer_types, windows)):
        groups.setdefault(t, ([], min(tokens, w or tokens)))[0].append(i)
    return tuple((tuple(layers), kept) for layers, kept in groups.values())


@dataclass
class KVHandoff:
    kv: torch.Tensor  # 1-D, contiguous, laid out as `groups` says
    groups: Groups
    kv_heads: int
    head_dim: int
    last_token: int  # t_N: the boundary token decode runs through the full model first
    rope_delta: int  # mRoPE: a token at cache index i sits at position i + rope_delta
    pop_ratio: float
    skipped_layers: int
    fingerprint: str  # pop_fingerprint(model, k)
    prompt_tokens: int  # N (the handoff holds N-1 of them, or a window's worth in sliding layers)
    created_at: float = 0.0  # wall clock when prefill finished, to time the handoff
    cached_tokens: int = 0  # of the N-1, how many came from the prefill's prefix cache
    prompt_ids: Optional[torch.Tensor] = None  # t_1..t_N, for repetition_penalty (counts the prompt)

    @staticmethod
    def pack(kv: torch.Tensor, layer_types: Sequence[str], windows: Sequence[Optional[int]], **meta) -> "KVHandoff":
        """The handoff of a prompt's KV [L, 2, kv_heads, N-1, head_dim]: each layer cut to the tokens
        its window reaches, grouped by type. No copy when that is all of `kv` in its own order."""
        _, _, heads, tokens, dim = kv.shape
        groups = layer_groups(layer_types, windows, tokens)
        if len(groups) == 1 and groups[0][1] == tokens:  # one type that keeps every token
            flat = kv.contiguous().view(-1)
        else:
            flat = torch.empty(_numel(groups, heads, dim), dtype=kv.dtype, device=kv.device)
            for (layers, n), dest in zip(groups, _split(flat, groups, heads, dim)):
                torch.index_select(kv[:, :, :, tokens - n:], 0, torch.tensor(layers, device=kv.device), out=dest)
        return KVHandoff(kv=flat, groups=groups, kv_heads=heads, head_dim=dim, **meta)

    def blocks(self, device: Optional[torch.device] = None) -> list[torch.Tensor]:
        """Per group, its K/V [layers, 2, kv_heads, kept, head_dim]: views of the buffer, moved to
        `device` first (in one copy) if it is elsewhere."""
        return _split(self.kv if device is None else self.kv.to(device), self.groups, self.kv_heads, self.head_dim)

    def layers(self) -> list[torch.Tensor]:
        """Layer by layer, in the model's order, its K/V [2, kv_heads, kept, head_dim] (views)."""
        out: dict[int, torch.Tensor] = {}
        for (layers, _), block in zip(self.groups, self.blocks()):
            out.update(zip(layers, block))
        return [out[i] for i in sorted(out)]

    @property
    def kept(self) -> tuple[int, ...]:
        """Per layer, in the model's order, how many of the prompt's last tokens it keeps."""
        return tuple(n for _, n in sorted((i, n) for layers, n in self.groups for i in layers))

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens - 1

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def check(self, accepted: dict[str, int], layer_types: Sequence[str], windows: Sequence[Optional[int]],
              kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Raise HandoffMismatch unless a decoder of these layers (types, and the keys each
        reaches: None for all) can consume the handoff."""
        if self.fingerprint not in accepted:
            raise HandoffMismatch(
                f"KV handoff from another model or POP config (fingerprint {self.fingerprint}, "
                f"pop_ratio {self.pop_ratio:.3f}, k={self.skipped_layers}); this decoder accepts "
                f"k in {sorted(set(accepted.values()))} of its own model"
            )
        want = layer_groups(layer_types, windows, self.num_tokens)
        if ((self.groups, self.kv_heads, self.head_dim, self.kv.dtype) != (want, kv_heads, head_dim, dtype)
                or self.kv.numel() != _numel(want, kv_heads, head_dim)
                or not self.kv.is_contiguous()):
            raise HandoffMismatch(f"KV handoff of {_describe(self.groups)}, {self.kv_heads} kv heads x {self.head_dim}, "
                                  f"{self.kv.dtype}, {self.kv.numel()} values; expected {_describe(want)}, "
                                  f"{kv_heads} x {head_dim}, {dtype}")


def _numel(groups: Groups, heads: int, dim: int) -> int:
    return sum(len(layers) * 2 * heads * n * dim for layers, n in groups)


def _split(flat: torch.Tensor, groups: Groups, heads: int, dim: int) -> list[torch.Tensor]:
    sizes = [_numel((group,), heads, dim) for group in groups]
    return [part.view(len(layers), 2, heads, n, dim) for part, (layers, n) in zip(flat.split(sizes), groups)]


def _describe(groups: Groups) -> str:
    """"20 layers keeping 512 tokens, 4 layers keeping 2047 tokens": a handoff's layout, short."""
    return ", ".join(f"{len(layers)} layers keeping {n} tokens" for layers, n in groups) or "no layers"
