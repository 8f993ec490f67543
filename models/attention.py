"""Prefill attention for sliding-window layers: each block of queries meets only the keys it sees.

transformers computes a sliding layer's prompt attention (Gemma-3: five of every six layers) over
the whole prompt under a mask, which costs the square of the prompt however short the window.
`windowed_sdpa` runs transformers' own SDPA call per block of `window` queries over the keys that
the block's mask lets any of them see (the block, the window before it, and whatever the mask adds:
an image's bidirectional block, the prefix cache's keys), so a prompt of T tokens costs T x 2 window
pairs. Keys outside that range are masked for every query of the block, so the result is the same
up to the order of summation. Everything else (full-attention layers, prompts within two windows,
no mask) goes to transformers' SDPA unchanged. Registered with transformers' AttentionInterface.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "popserve_windowed_sdpa"


def windowed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask, *args, sliding_window=None, **kwargs):
    """transformers' attention-function signature: query [B, heads, Q, D], key and value
    [B, kv_heads, K, D], a boolean mask [B, 1, Q, K]; returns ([B, Q, heads, D], None)."""
    q_len = query.shape[2]
    if not sliding_window or attention_mask is None or q_len <= 2 * sliding_window:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args,
                                      sliding_window=sliding_window, **kwargs)
    outs = []
    for q0, (lo, hi) in zip(range(0, q_len, sliding_window), _key_ranges(attention_mask, sliding_window)):
        q1 = q0 + sliding_window
        out, _ = sdpa_attention_forward(module, query[:, :, q0:q1], key[:, :, lo:hi], value[:, :, lo:hi],
                                        attention_mask[:, :, q0:q1, lo:hi], *args,
                                        sliding_window=sliding_window, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _key_ranges(mask: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """For each block of `block` queries, the range of keys some query of it sees (each sees at
    least itself): all blocks at once, one wait for the device per layer, not one per block."""
    seen = mask.any(dim=(0, 1))  # [Q, K]
    q_len, k_len = seen.shape
    seen = torch.nn.functional.pad(seen, (0, 0, 0, -q_len % block)).view(-1, block, k_len).any(1)
    k = torch.arange(k_len, device=mask.device)
    lo = torch.where(seen, k, k_len).amin(1)
    hi = torch.where(seen, k, -1).amax(1) + 1
    return [tuple(r) for r in torch.stack((lo, hi), 1).tolist()]


AttentionInterface.register(NAME, windowed_sdpa)
