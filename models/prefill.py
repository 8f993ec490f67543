"""PrunedPrefill stage: POP over t_1..t_{N-1}, producing one KV handoff per prompt.

Layers 0..L-k-1 run in full (transformers' own decoder layers); each skipped layer only writes
its independent K/V projection of the hidden state h leaving layer L-k-1 (models/pop.py). No final
norm or LM head: t_N, the last prompt token, is decode's first step (boundary handling).
With a prefix cache (models/prefix_cache.py), a prompt's cached leading blocks are not computed
again: its other tokens attend to their KV as to earlier tokens of the same batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import attention
from .families import ImageFeatures
from .families.base import get_module
from .kv import KVHandoff, pop_fingerprint
from .loading import fast_cpu_linears, load_checkpoint, param_bytes, release
from .masks import prefill_masks
from .pop import independent_kv, skipped_layer_count
from .prefix_cache import ImageSpan, PrefixCache, block_keys


@dataclass
class PrefillRequest:
    input_ids: torch.Tensor  # [N] the whole prompt, t_1..t_N
    mm_token_type_ids: Optional[torch.Tensor] = None
    images: list[ImageFeatures] = field(default_factory=list)  # in prompt order
    cache_salt: Optional[str] = None  # prefix-cache reuse only between prompts of the same salt


class _KVCollector:
    """Stands in for a transformers Cache: attention layers hand it the new tokens' K/V, we keep
    them after the cached ones, and attention reads both."""

    def __init__(self, buf: torch.Tensor, past: int):
        self.buf = buf  # [L, 2, B, kv_heads, past + S, head_dim]; cached prefixes first
        self.past = past

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.buf[layer_idx, 0, :, :, self.past:] = k
        self.buf[layer_idx, 1, :, :, self.past:] = v
        if not self.past:
            return k, v
        return self.buf[layer_idx, 0], self.buf[layer_idx, 1]


class PrunedPrefill:
    def __init__(self, model: str | Path, pop_ratio: float = 1 / 3, dtype: str = "auto", device: str = "cpu",
                 prefix_cache_bytes: int = 0):
        loaded = load_checkpoint(model, dtype, device)
        fam = self.family = loaded.family
        self.pop_ratio = pop_ratio
        self.k = skipped_layer_count(fam.num_layers, pop_ratio, first_kept=fam.num_deepstack)
        self.num_kept = fam.num_layers - self.k
        self.device, self.dtype = loaded.device, loaded.dtype
        self.model_fingerprint = loaded.fingerprint
        self.fingerprint = pop_fingerprint(loaded.fingerprint, self.k)
        text = get_module(loaded.model, fam.text_path)
        text.norm = None  # prompt tokens never reach the final norm or the LM head
        text.config._attn_implementation = attention.NAME  # SDPA; sliding layers over their window's keys
        for layer in text.layers[self.num_kept:]:
            fam.strip_to_kv_projection(layer)
        self.text = text.to(self.device)
        release(loaded)
        if self.device.type == "cpu":
            (self.text,) = fast_cpu_linears(self.text)
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None

    def param_bytes(self) -> int:
        return param_bytes(self.text)

    def cache_stats(self) -> dict:
        return (self.cache or PrefixCache(0)).stats()

    def cached_tokens(self, request: PrefillRequest) -> int:
        """How many of the prompt's tokens the prefix cache holds now (a peek: no hit counted,
        nothing refreshed): what a prefill of it would not compute."""
        if not self.cache:
            return 0
        prompt = request.input_ids[:-1]
        keys = block_keys(prompt, self._image_spans(request, prompt), request.cache_salt)
        return self.cache.peek(keys, prompt.numel())

    @torch.inference_mode()
    def prefill(self, requests: list[PrefillRequest]) -> list[KVHandoff]:
        """Several prompts in one right-padded batch."""
        fam, text, dev, cache = self.family, self.text, self.device, self.cache
        if any(r.input_ids.numel() < 1 for r in requests):
            raise ValueError("empty prompt")
        prompts = [r.input_ids[:-1] for r in requests]  # t_1..t_{N-1}
        spans = [self._image_spans(r, p) for r, p in zip(requests, prompts)]
        keys = [block_keys(p, s, r.cache_salt) if cache else [] for r, p, s in zip(requests, prompts, spans)]
        cached = [cache.lookup(k, p.numel()) if cache else (0, None) for k, p in zip(keys, prompts)]
        past = [n for n, _ in cached]  # leading tokens whose KV the cache has
        lengths = [p.numel() - n for p, n in zip(prompts, past)]  # the tokens to compute
        width, past_width = max(max(lengths), 1), max(past)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        positions, deltas = [], []
        for b, (r, p, n) in enumerate(zip(requests, prompts, past)):
            ids[b, : lengths[b]] = p[n:]
            grids = [f.grid_thw for f in r.images if f.grid_thw is not None]
            pos, delta = fam.positions(r.input_ids, r.mm_token_type_ids, grids)
            positions.append(pos[:, n:-1])
            deltas.append(delta)
        ids = ids.to(dev)
        hidden = fam.embed(text, ids)
        visual = self._place_images(requests, prompts, past, ids, hidden)
        blocks = fam.image_blocks(ids) if any(r.images for r in requests) else None
        pe = fam.rotary(text, hidden, fam.batch_positions(positions, width).to(dev))
        masks = prefill_masks(fam, lengths, width, blocks, dev, past)

        buf = torch.empty(fam.num_layers, 2, len(requests), fam.num_kv_heads, past_width + width, fam.head_dim,
                          dtype=hidden.dtype, device=dev)
        for b, (n, kv) in enumerate(cached):
            if n:
                buf[:, :, b, :, :n] = kv
            # masked out, but attention still multiplies them: stale memory could hold NaN
            buf[:, :, b, :, n:past_width] = 0
        collector = _KVCollector(buf, past_width)
        for i in range(self.num_kept):
            t = fam.layer_types[i]
            hidden = text.layers[i](hidden, position_embeddings=pe[t], attention_mask=masks[t], cache=collector)
            hidden = fam.inject_visual(hidden, i, visual)
        for i in range(self.num_kept, fam.num_layers):  # skipped: identity + independent K/V
            k, v = independent_kv(text.layers[i], hidden, *pe[fam.layer_types[i]])
            buf[i, 0, :, :, past_width:], buf[i, 1, :, :, past_width:] = k, v

        now, out = time.time(), []
        for b, r in enumerate(requests):
            n, m = past[b], lengths[b]
            if n == past_width:  # a view, no copy, when the batch is one prompt
                kv = buf[:, :, b, :, : n + m].contiguous()
            else:
                kv = torch.cat((buf[:, :, b, :, :n], buf[:, :, b, :, past_width: past_width + m]), dim=3)
            # Packed before the cache copies its blocks: the pack's buffer then reuses what the
            # forward just freed, where after them it was fresh memory, page-faulted in while the
            # cache fills (24-46 ms for a 2048-token bench Gemma-3 handoff, against 2-3 ms).
            out.append(KVHandoff.pack(
                kv, fam.layer_types, fam.layer_windows, last_token=int(r.input_ids[-1]), rope_delta=deltas[b],
                pop_ratio=self.pop_ratio, skipped_layers=self.k, fingerprint=self.fingerprint, prompt_tokens=n + m + 1,
                created_at=now, cached_tokens=n, prompt_ids=r.input_ids,
            ))
            if cache:  # whole: a longer prompt reusing these blocks reaches past a window of them
                cache.insert(keys[b], kv)
        return out

    def _image_spans(self, request: PrefillRequest, prompt: torch.Tensor) -> list[ImageSpan]:
        """Where each image's placeholder tokens lie in the prompt (images fill them in order)."""
        where = (prompt == self.family.image_token_id).nonzero().flatten().tolist()
        sizes = [f.num_tokens for f in request.images]
        if len(where) != sum(sizes):
            raise ValueError(f"prompt has {len(where)} image tokens but images give {sum(sizes)} features")
        spans, first = [], 0
        for f, size in zip(request.images, sizes):
            if size:
                spans.append(ImageSpan(where[first], where[first + size - 1] + 1, f.key))
            first += size
        return spans

    def _place_images(self, requests, prompts, past, ids, hidden):
        """Scatter the computed tokens' image embeddings over their placeholders (in place);
        return what the family needs later (deepstack features), or None for text-only batches."""
        if not any(r.images for r in requests):
            return None
        fam = self.family
        feats = []
        for r, p, n in zip(requests, prompts, past):
            if r.images:  # an image's rows before `n` belong to cached tokens
                done = int((p[:n] == fam.image_token_id).sum())
                feats.append(torch.cat([f.data for f in r.images], dim=1)[:, done:].to(hidden.device, hidden.dtype))
        joined = torch.cat(feats, dim=1)  # [1 + deepstack, n_visual, hidden], batch-major order
        mask = ids == fam.image_token_id
        hidden[mask] = joined[0]
        return (mask, list(joined[1:])) if joined.shape[0] > 1 else None
