"""Gemma-3: scaled embeddings, sliding-window layers with their own rotary base, and
bidirectional attention among the tokens of one image during prefill."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.gemma3 import modeling_gemma3 as hf

from .base import Family, ImageFeatures, PixelInputs


class Gemma3Family(Family):
    name = "gemma3"
    model_type = "gemma3"
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    apply_rope = staticmethod(hf.apply_rotary_pos_emb)
    sandwich_norms = True

    @staticmethod
    def model_class():
        return hf.Gemma3ForConditionalGeneration

    def _image_token_id(self) -> int:
        return self.config.image_token_id

    # ---- vision ----------------------------------------------------------------------------
    def split_pixels(self, batch) -> list[PixelInputs]:
        return [PixelInputs(p) for p in batch["pixel_values"]]

    def encode_pixels(self, vision: nn.Module, items: list[PixelInputs]) -> list[ImageFeatures]:
        tower, projector = vision.vision_tower, vision.multi_modal_projector
        dtype = next(tower.parameters()).dtype
        pixels = torch.stack([it.pixel_values for it in items]).to(tower.device, dtype)
        hidden = tower(pixel_values=pixels, return_dict=True).last_hidden_state
        feats = projector(hidden)  # [n_images, tokens, hidden]
        return [ImageFeatures(f.unsqueeze(0).contiguous()) for f in feats]

    # ---- text ------------------------------------------------------------------------------
    def embed(self, text, input_ids):
        # The image soft token may lie outside the text vocabulary; its rows are replaced anyway.
        if self.image_token_id >= text.embed_tokens.num_embeddings:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return text.embed_tokens(input_ids)

    def rotary(self, text, x, position_ids):
        return {t: text.rotary_emb(x, position_ids, t) for t in set(self.layer_types)}

    def image_blocks(self, input_ids):
        is_image = input_ids == self.image_token_id
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[..., :-1]
        return torch.where(is_image, starts.cumsum(-1) - 1, -1)

    def sliding_window(self, layer_type):
        return self.text_config.sliding_window if layer_type == "sliding_attention" else None
