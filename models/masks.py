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


def prefill_masks(family: Family, lengths: list[int], width: int, blocks: Optional[torch.Tensor], device,
                  past: Optional[list[int]] = None) -> dict[str, Optional[torch.Tensor]]:
    """Masks [B, 1, width, keys] for `lengths[b]` new tokens of prompt b (right-padded to width)
    that follow `past[b]` cached ones (prefix cache). Keys are the cached tokens' slots
    0..max(past)-1, then the new tokens' slots; rules apply to cache indices, not slots."""
    past = past or [0] * len(lengths)
    past_width = max(past)
    q = torch.arange(width, device=device)
    has_blocks = blocks is not None and bool((blocks >= 0).any())
    base = None
    masks: dict[str, Optional[torch.Tensor]] = {}
    for layer_type in set(family.layer_types):
        window = family.sliding_window(layer_type)
        if not past_width and not has_blocks and (window is None or width <= window):
            # Plain causal. Right padding needs no mask: a real token's keys all come before it,
            # and padded rows are discarded.
            masks[layer_type] = None
            continue
        if base is None:
            cached = torch.tensor(past, device=device)[:, None]  # [B, 1]
            slot = torch.arange(past_width + width, device=device)[None, :]  # [1, K]
            new = slot >= past_width
            qpos = cached + q[None, :]  # [B, W] cache index of each query
            kpos = torch.where(new, cached + slot - past_width, slot)  # [B, K] cache index of each key
            valid = torch.where(new, slot - past_width < torch.tensor(lengths, device=device)[:, None],
                                slot < cached)  # [B, K] real keys
            allow = kpos[:, None, :] <= qpos[:, :, None]  # [B, W, K] causal
            if has_blocks:
                b = blocks.to(device)
                allow[:, :, past_width:] |= (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
            base = allow & valid[:, None, :]
            # A padded query row must attend somewhere, or SDPA returns NaN for it (discarded anyway).
            own = slot == q[:, None] + past_width  # [W, K] each query's own slot
        m = base & (kpos[:, None, :] > qpos[:, :, None] - window) if window is not None else base
        masks[layer_type] = (m | own).unsqueeze(1)
    return masks


def decode_masks(family: Family, cache_index: torch.Tensor, width: int,
                 capacity: Optional[dict[str, int]] = None) -> dict[str, torch.Tensor]:
    """One new token per sequence at cache_index[b]; keys 0..width-1 of each sequence's slot.
    With `capacity` (the decoder's pools), a layer type's keys are its entries 0..min(width,
    capacity)-1: a sliding layer whose pool holds just its window keeps cache index i in entry i
    mod window, so every entry written so far is in the window, and the written ones are those up
    to the new token's index, wrapped or not."""
    pos = cache_index[:, None]
    masks = {}
    for layer_type in set(family.layer_types):
        window = family.sliding_window(layer_type)
        cap = (capacity or {}).get(layer_type)
        k = torch.arange(width if cap is None else min(width, cap), device=cache_index.device)[None, :]
        m = k <= pos
        if window is not None and cap is None:
            m = m & (k > pos - window)
        masks[layer_type] = m[:, None, None, :]  # [B, 1, 1, W]
    return masks
