"""PrunedPrefill stage: POP over t_1..t_{N-1}, producing one KV handoff per prompt.

Layers 0..L-k-1 run in full (transformers' own decoder layers); each skipped layer only writes
its independent K/V projection of the hidden state h leaving layer L-k-1 (models/pop.py). No final
norm or LM head: t_N, the last prompt token, is decode's first step (boundary handling).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .families import ImageFeatures
from .families.base import get_module
from .kv import KVHandoff, pop_fingerprint
from .loading import fast_cpu_linears, load_checkpoint, param_bytes, release
from .masks import prefill_masks
from .pop import independent_kv, skipped_layer_count


@dataclass
class PrefillRequest:
    input_ids: torch.Tensor  # [N] the whole prompt, t_1..t_N
    mm_token_type_ids: Optional[torch.Tensor] = None
    images: list[ImageFeatures] = field(default_factory=list)  # in prompt order


class _KVCollector:
    """Stands in for a transformers Cache: attention layers hand it their K/V, we keep them."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf  # [L, 2, B, kv_heads, S, head_dim]

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.buf[layer_idx, 0] = k
        self.buf[layer_idx, 1] = v
        return k, v


class PrunedPrefill:
    def __init__(self, model: str | Path, pop_ratio: float = 1 / 3, dtype: str = "auto", device: str = "cpu"):
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
        for layer in text.layers[self.num_kept:]:
            fam.strip_to_kv_projection(layer)
        self.text = text.to(self.device)
        release(loaded)
        if self.device.type == "cpu":
            (self.text,) = fast_cpu_linears(self.text)

    def param_bytes(self) -> int:
        return param_bytes(self.text)

    @torch.inference_mode()
    def prefill(self, requests: list[PrefillRequest]) -> list[KVHandoff]:
        """Several prompts in one right-padded batch."""
        fam, text, dev = self.family, self.text, self.device
        if any(r.input_ids.numel() < 1 for r in requests):
            raise ValueError("empty prompt")
        prefixes = [r.input_ids[:-1] for r in requests]  # t_1..t_{N-1}
        lengths = [p.numel() for p in prefixes]
        width = max(max(lengths), 1)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        positions, deltas = [], []
        for b, (r, p) in enumerate(zip(requests, prefixes)):
            ids[b, : p.numel()] = p
            grids = [f.grid_thw for f in r.images if f.grid_thw is not None]
            pos, delta = fam.positions(r.input_ids, r.mm_token_type_ids, grids)
            positions.append(pos[:, :-1])
            deltas.append(delta)
        ids = ids.to(dev)
        hidden = fam.embed(text, ids)
        visual = self._place_images(requests, ids, hidden)
        blocks = fam.image_blocks(ids) if any(r.images for r in requests) else None
        pe = fam.rotary(text, hidden, fam.batch_positions(positions, width).to(dev))
        masks = prefill_masks(fam, lengths, width, blocks, dev)

        buf = torch.empty(fam.num_layers, 2, len(requests), fam.num_kv_heads, width, fam.head_dim,
                          dtype=hidden.dtype, device=dev)
        cache = _KVCollector(buf)
        for i in range(self.num_kept):
            t = fam.layer_types[i]
            hidden = text.layers[i](hidden, position_embeddings=pe[t], attention_mask=masks[t], cache=cache)
            hidden = fam.inject_visual(hidden, i, visual)
        for i in range(self.num_kept, fam.num_layers):  # skipped: identity + independent K/V
            k, v = independent_kv(text.layers[i], hidden, *pe[fam.layer_types[i]])
            buf[i, 0], buf[i, 1] = k, v

        now = time.time()
        return [
            KVHandoff(
                kv=buf[:, :, b, :, :n].contiguous(),  # a view, no copy, when the batch is one prompt
                last_token=int(r.input_ids[-1]), rope_delta=deltas[b], pop_ratio=self.pop_ratio,
                skipped_layers=self.k, fingerprint=self.fingerprint, prompt_tokens=n + 1, created_at=now,
            )
            for b, (r, n) in enumerate(zip(requests, lengths))
        ]

    def _place_images(self, requests, ids, hidden):
        """Scatter image embeddings over their placeholder tokens (in place); return what
        the family needs later (deepstack features), or None for text-only batches."""
        if not any(r.images for r in requests):
            return None
        fam = self.family
        mask = ids == fam.image_token_id
        feats = [f.data.to(hidden.device, hidden.dtype) for r in requests for f in r.images]
        joined = torch.cat(feats, dim=1)  # [1 + deepstack, n_visual, hidden], batch-major order
        if joined.shape[1] != int(mask.sum()):
            raise ValueError(f"prompt has {int(mask.sum())} image tokens but images give {joined.shape[1]} features")
        hidden[mask] = joined[0]
        return (mask, list(joined[1:])) if joined.shape[0] > 1 else None
