"""Attention masks per layer type, as boolean tensors SDPA takes (True = may attend).

One set of rules for both families: causal; right padding; an optional sliding window
(Gemma-3 local layers: key > query - window); optional bidirectional blocks (Gemma-3 image
tokens of the same image see each other in prefill). Returns None where plain causal SDPA does
the same job, which lets torch use its fastest causal kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .families import Family


def prefill_masks(family: Family, lengths: list[int], width: int,
                  blocks: Optional[torch.Tensor], device) -> dict[str, Optional[torch.Tensor]]:
    q = torch.arange(width, device=device)
    has_blocks = blocks is not None and bool((blocks >= 0).any())
    base = None
    masks: dict[str, Optional[torch.Tensor]] = {}
    for layer_type in set(family.layer_types):
        window = family.sliding_window(layer_type)
        if not has_blocks and (window is None or width <= window):
            # Plain causal. Right padding needs no mask: a real token's keys all come before it,
            # and padded rows are discarded.
            masks[layer_type] = None
            continue
        if base is None:
            allow = (q[None, :] <= q[:, None]).unsqueeze(0)  # [1, W, W] causal
            if has_blocks:
                b = blocks.to(device)
                allow = allow | ((b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0))
            valid = q[None, :] < torch.tensor(lengths, device=device)[:, None]  # [B, W] real keys
            base = allow & valid[:, None, :]
        m = base & (q[None, :] > q[:, None] - window) if window is not None else base
        # A padded query row must attend somewhere, or SDPA returns NaN for it (discarded anyway).
        masks[layer_type] = (m | torch.eye(width, dtype=torch.bool, device=device)).unsqueeze(1)
    return masks


def decode_masks(family: Family, cache_index: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """One new token per sequence at cache_index[b]; keys 0..width-1 of each sequence's slot."""
    k = torch.arange(width, device=cache_index.device)[None, :]
    pos = cache_index[:, None]
    causal = k <= pos
    masks = {}
    for layer_type in set(family.layer_types):
        window = family.sliding_window(layer_type)
        m = causal & (k > pos - window) if window is not None else causal
        masks[layer_type] = m[:, None, None, :]  # [B, 1, 1, W]
    return masks
