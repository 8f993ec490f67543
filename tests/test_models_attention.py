"""Sliding layers' prefill attention over the keys each block of queries sees (models/attention.py):
the same result as transformers' SDPA over the whole prompt under the same masks (padding, the
prefix cache's keys, Gemma-3's bidirectional image blocks longer than the window), computed over
about two windows of keys per block, not the prompt."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from popserve.models import attention
from popserve.models.masks import prefill_masks
from popserve.models.prefill import PrunedPrefill


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    pre = PrunedPrefill(gemma_dir, 1 / 3, dtype="float32")
    sliding = next(i for i, t in enumerate(pre.family.layer_types) if pre.family.sliding_window(t))
    return pre, pre.text.layers[sliding].self_attn


def key_widths(monkeypatch) -> list[int]:
    """The number of keys of every SDPA call from now on (the real call runs)."""
    widths, real = [], torch.nn.functional.scaled_dot_product_attention

    def counting(query, key, *args, **kwargs):
        widths.append(key.shape[-2])
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return widths


@pytest.mark.parametrize("case", ["padding", "prefix_cache", "image_block"])
def test_windowed_attention_is_sdpa_over_the_keys_each_block_sees(gemma, case, monkeypatch):
    pre, module = gemma
    fam, window = pre.family, module.sliding_window
    assert window == 8  # the tiny checkpoint's: every prompt here spans several windows
    lengths, past, blocks = [61, 40], [0, 0], None
    if case == "prefix_cache":
        past = [16, 5]
    if case == "image_block":  # 20 image tokens that see each other, longer than the window
        blocks = torch.full((2, 61), -1)
        blocks[:, 30:50] = 0
    width = max(lengths)
    mask = prefill_masks(fam, lengths, width, blocks, "cpu", past)["sliding_attention"]
    assert mask is not None
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = module.config.num_attention_heads, fam.num_kv_heads, fam.head_dim
    query = torch.randn(2, heads, width, dim, generator=gen)
    key, value = (torch.randn(2, kv_heads, max(past) + width, dim, generator=gen) for _ in range(2))
    whole, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)
    widths = key_widths(monkeypatch)
    out, _ = attention.windowed_sdpa(module, query, key, value, mask, scaling=module.scaling, sliding_window=window)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    assert len(widths) == -(-width // window)  # one call per block of queries
    # An image block's keys reach past the window, and the first block spans the cached slots
    # of a shorter cached prefix too (the range is over the batch).
    reach = {"image_block": 20, "prefix_cache": max(past)}.get(case, 0)
    assert max(widths) <= 2 * window + reach < max(past) + width, widths


def test_short_prompts_and_full_attention_layers_are_plain_sdpa(gemma, monkeypatch):
    """Within two windows, or without a window (full-attention layers, Qwen3-VL), one SDPA call
    over every key: the blocks would save nothing."""
    pre, module = gemma
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, h, 16, pre.family.head_dim, generator=gen)
                         for h in (module.config.num_attention_heads, pre.family.num_kv_heads, pre.family.num_kv_heads))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()
    widths = key_widths(monkeypatch)
    for window in (8, None):
        attention.windowed_sdpa(module, query, key, value, mask, scaling=module.scaling, sliding_window=window)
    assert widths == [16, 16]


def test_prefill_runs_its_attention_through_the_windowed_function(gemma_dir, qwen_dir):
    """The prefill runner's text layers dispatch to it (transformers' AttentionInterface), in both
    families; what it computes is held to transformers' generate by tests/test_models_equivalence.py."""
    for model in (gemma_dir, qwen_dir):
        text = PrunedPrefill(model, 1 / 3, dtype="float32").text
        assert {layer.self_attn.config._attn_implementation for layer in text.layers} == {attention.NAME}
