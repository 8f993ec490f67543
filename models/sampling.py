"""Token sampling for a batch of sequences, each with its own parameters and seed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> Optional[torch.Generator]:
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()  # non-deterministic, and only this generator's (torch.seed() reseeds the global RNG)
        return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits [B, V] (float32) -> one token id per row."""
    out = logits.argmax(-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        x = logits[row].float().cpu() / p.temperature  # the seeded generator lives on the CPU
        if p.top_k:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, -1) >= p.top_p  # keep the smallest prefix reaching top_p
            x = x.scatter(0, idx[drop], float("-inf"))
        probs = torch.softmax(x, -1)
        out[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
