"""Prefill-Only Pruning: which layers prefill skips, and what a skipped layer still writes.

Written once for every family (see ../shared/POP.md). A skipped layer is the identity for the
hidden state, but it still writes its K/V for the prompt tokens, projected independently from the
input it would have had (paper Eq. 14):  u = norm_l(h);  K = RoPE(k_norm(u W_K));  V = u W_V.
"""
from __future__ import annotations

import torch
from torch import nn


class PopConfigError(ValueError):
    pass


def skipped_layer_count(num_layers: int, ratio: float, first_kept: int = 0) -> int:
    """k = round(L * ratio), the last k layers. `first_kept` layers must never be skipped
    (Qwen3-VL adds deepstack features after its first layers)."""
    if not 0.0 <= ratio < 1.0:
        raise PopConfigError(f"pop_ratio must be in [0, 1); got {ratio}")
    k = round(num_layers * ratio)
    if k >= num_layers:
        raise PopConfigError(
            f"pop_ratio {ratio} would skip all {num_layers} decoder layers in prefill; use a smaller ratio")
    if num_layers - k < first_kept:
        raise PopConfigError(
            f"pop_ratio {ratio} would skip layer {num_layers - k}, which receives Qwen3-VL deepstack "
            f"features (layers 0..{first_kept - 1}); the largest allowed k is {num_layers - first_kept}")
    return k


def max_pop_ratio(num_layers: int, first_kept: int = 0) -> float:
    """The largest pop_ratio `skipped_layer_count` accepts, as k/L with k the most layers it lets
    prefill skip (all but the first max(first_kept, 1)); ratios that round to the same k also pass."""
    return max(num_layers - max(first_kept, 1), 0) / num_layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def independent_kv(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """K, V [B, kv_heads, S, head_dim] of a skipped layer from the hidden state h entering it.
    No Q, attention, O projection or MLP: just the layer's own norm, K/V projections, k_norm, RoPE."""
    attn = layer.self_attn
    u = layer.input_layernorm(h)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(u).view(shape)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(u).view(shape).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return k * cos + _rotate_half(k) * sin, v
