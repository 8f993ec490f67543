"""One decoder layer's decode step, lean: the layer's own modules, fewer calls.

A decode step feeds one token per sequence through every layer, so it pays transformers' eager
overhead per module call rather than per FLOP: on the bench shape about half of a batch-1 step
was call overhead (docs/performance.md). This runs the same layer with q/k/v and gate/up each
fused into one matmul (the same dot products: bit-identical outputs, tested against the layer's
own forward) and calls SDPA directly. Norms, rotary, activation and output projections are the
layer's own modules and functions; `Family.sandwich_norms` says where Gemma-3's extra norms go.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .families import Family
from .families.base import get_module
from .loading import fast_cpu_linears


def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side (they share the input)."""
    weight = torch.cat([lin.weight.detach() for lin in linears], 0)
    has_bias = {lin.bias is not None for lin in linears}
    if len(has_bias) > 1:
        raise ValueError("cannot fuse Linears with and without bias")
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias.pop(), device="meta")  # no init
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears], 0), requires_grad=False)
    return fused


class DecodeLayer(nn.Module):
    def __init__(self, layer: nn.Module, family: Family):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "attn_logit_softcapping", None):  # not in Qwen3-VL or Gemma-3; SDPA has no softcap
            raise ValueError("attention logit soft-capping is not supported")
        num_heads = attn.config.num_attention_heads
        self.num_kv_heads, self.head_dim = family.num_kv_heads, family.head_dim
        self.groups = num_heads // self.num_kv_heads  # query heads per KV head
        self.scaling, self.apply_rope = attn.scaling, family.apply_rope
        q, kv = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_split = (q, kv, kv)
        self.qkv = fused_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.q_norm, self.k_norm, self.o_proj = attn.q_norm, attn.k_norm, attn.o_proj
        self.gate_up = fused_linear(mlp.gate_proj, mlp.up_proj)
        self.act, self.down_proj = mlp.act_fn, mlp.down_proj
        self.input_norm = layer.input_layernorm
        if family.sandwich_norms:  # Gemma-3: attention and MLP outputs are normalized too
            self.attn_out_norm, self.mlp_in_norm = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
            self.mlp_out_norm = layer.post_feedforward_layernorm
        else:
            self.attn_out_norm, self.mlp_in_norm, self.mlp_out_norm = None, layer.post_attention_layernorm, None

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache, layer_idx: int) -> torch.Tensor:
        """hidden [B, 1, H]; cache.update(k, v, layer_idx) stores this step's K/V ([B, kv_heads, 1,
        head_dim]) and returns every key and value the step attends to ([B, kv_heads, width, head_dim])."""
        batch, hd = hidden.shape[0], self.head_dim
        x = self.input_norm(hidden)
        q, k, v = self.qkv(x).split(self.qkv_split, -1)
        q = self.q_norm(q.view(batch, 1, -1, hd)).transpose(1, 2)
        k = self.k_norm(k.view(batch, 1, -1, hd)).transpose(1, 2)
        v = v.view(batch, 1, -1, hd).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        keys, values = cache.update(k, v, layer_idx)
        # Grouped-query attention with one query token: the heads of a KV group become its queries.
        out = F.scaled_dot_product_attention(q.reshape(batch, self.num_kv_heads, self.groups, hd), keys, values,
                                             attn_mask=mask, scale=self.scaling)
        out = self.o_proj(out.reshape(batch, 1, -1))
        if self.attn_out_norm is not None:
            out = self.attn_out_norm(out)
        hidden = hidden + out
        gate, up = self.gate_up(self.mlp_in_norm(hidden)).chunk(2, -1)
        out = self.down_proj(self.act(gate) * up)
        if self.mlp_out_norm is not None:
            out = self.mlp_out_norm(out)
        return hidden + out


class TransformersLayer(nn.Module):
    """A checkpoint's own transformers decoder layer behind DecodeLayer's call signature: the
    reference that tests and bench/decode_layers.py hold DecodeLayer against."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, cos, sin, mask, cache, layer_idx):
        return self.layer(hidden, position_embeddings=(cos, sin), attention_mask=mask, cache=cache)


def transformers_layers(model_dir, family: Family, dtype: torch.dtype, device) -> nn.ModuleList:
    """The checkpoint's layers, loaded afresh and laid out like the decoder's on CPU (float32
    row- and column-major matmuls round differently), wrapped as TransformersLayer."""
    model = family.model_class().from_pretrained(model_dir, dtype=dtype).to(device).eval()
    layers = get_module(model, family.text_path).layers
    if torch.device(device).type == "cpu":
        (layers,) = fast_cpu_linears(layers)
    return nn.ModuleList(TransformersLayer(layer) for layer in layers)
