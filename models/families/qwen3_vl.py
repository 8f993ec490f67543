"""Qwen3-VL: 3-D mRoPE positions with rope deltas, and deepstack visual features added to the
hidden states after the first decoder layers."""
from __future__ import annotations

import types
from functools import partial
from typing import Optional

import torch
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

from .base import Family, ImageFeatures, PixelInputs


class Qwen3VLFamily(Family):
    name = "qwen3-vl"
    model_type = "qwen3_vl"
    vision_paths = ("model.visual",)
    apply_rope = staticmethod(hf.apply_rotary_pos_emb)

    @staticmethod
    def model_class():
        return hf.Qwen3VLForConditionalGeneration

    def _image_token_id(self) -> int:
        return self.config.image_token_id

    def __init__(self, config):
        super().__init__(config)
        self.merge = config.vision_config.spatial_merge_size
        # HF's own rope-index code, bound to a stand-in that carries only what it reads.
        self._rope_owner = types.SimpleNamespace(
            config=config, get_vision_position_ids=partial(hf.Qwen3VLModel.get_vision_position_ids, None)
        )

    @property
    def num_deepstack(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    # ---- vision ----------------------------------------------------------------------------
    def split_pixels(self, batch) -> list[PixelInputs]:
        grids = batch["image_grid_thw"].tolist()
        sizes = [t * h * w for t, h, w in grids]
        chunks = torch.split(batch["pixel_values"], sizes)
        return [PixelInputs(c, tuple(g)) for c, g in zip(chunks, grids)]

    def encode_pixels(self, vision: nn.Module, items: list[PixelInputs]) -> list[ImageFeatures]:
        tower = vision.visual
        pixels = torch.cat([it.pixel_values for it in items]).to(tower.device, tower.dtype)
        grid = torch.tensor([it.grid_thw for it in items], device=tower.device)
        out = tower(pixels, grid_thw=grid, return_dict=True)
        stacked = torch.stack([out.pooler_output, *out.deepstack_features])  # [1+D, tokens, hidden]
        sizes = [t * h * w // self.merge**2 for t, h, w in (it.grid_thw for it in items)]
        return [ImageFeatures(chunk.contiguous(), it.grid_thw)
                for chunk, it in zip(torch.split(stacked, sizes, dim=1), items)]

    # ---- text ------------------------------------------------------------------------------
    def positions(self, input_ids, mm_token_type_ids, grids):
        if not grids:
            return super().positions(input_ids, mm_token_type_ids, grids)
        pos, delta = hf.Qwen3VLModel.get_rope_index(
            self._rope_owner, input_ids.view(1, -1), mm_token_type_ids.view(1, -1),
            image_grid_thw=torch.tensor(grids),
        )
        return pos[:, 0], int(delta.item())

    def decode_positions(self, cache_index, rope_delta):
        return (cache_index + rope_delta).view(1, -1, 1).expand(3, -1, -1)

    def batch_positions(self, per_prompt, width):
        out = torch.zeros(3, len(per_prompt), width, dtype=torch.long)
        for b, p in enumerate(per_prompt):
            out[:, b, : p.shape[1]] = p.expand(3, -1)
        return out

    def rotary(self, text, x, position_ids):
        return {"full_attention": text.rotary_emb(x, position_ids)}

    def inject_visual(self, hidden, layer_idx, visual):
        # visual: (mask [B, S] of image positions, list of deepstack tensors [n_visual, hidden])
        if visual is None or layer_idx >= len(visual[1]):
            return hidden
        mask, deepstack = visual
        hidden = hidden.clone()
        hidden[mask] = hidden[mask] + deepstack[layer_idx].to(hidden.dtype)
        return hidden
