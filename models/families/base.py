"""What differs between model families, and nothing else.

POP (models/pop.py), the KV handoff (models/kv.py) and the stage runners are written once against
this interface; an adapter supplies the family's embedding, positions, rotary tables, attention
masks, visual-feature injection and the names of its submodules inside the HF model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn


@dataclass
class ImageFeatures:
    """One image's encoder output, packed as one tensor so it moves as one buffer.

    data[0] is the embedding that replaces the image's placeholder tokens; data[1:] are
    extra per-layer features (Qwen3-VL deepstack) added after the first decoder layers."""

    data: torch.Tensor  # [1 + n_deepstack, n_tokens, hidden]
    grid_thw: Optional[tuple[int, int, int]] = None  # Qwen3-VL only
    key: Optional[str] = None  # content digest of the source image, for the prefill's prefix cache

    @property
    def num_tokens(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class PixelInputs:
    """One image after the family's image processor: what the vision tower consumes."""

    pixel_values: torch.Tensor  # Qwen3-VL: [patches, dim]; Gemma-3: [3, H, W]
    grid_thw: Optional[tuple[int, int, int]] = None


class Family:
    name: ClassVar[str]
    model_type: ClassVar[str]
    # Module names inside `<Family>ForConditionalGeneration`.
    text_path: ClassVar[str] = "model.language_model"
    vision_paths: ClassVar[tuple[str, ...]]
    apply_rope: ClassVar[Callable]  # the family's apply_rotary_pos_emb from its HF modeling file
    # Gemma-3's layers also normalize the attention and MLP outputs (models/decode_layer.py).
    sandwich_norms: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config
        self.text_config = config.get_text_config()
        self.num_layers: int = self.text_config.num_hidden_layers
        self.layer_types: list[str] = list(
            getattr(self.text_config, "layer_types", None) or ["full_attention"] * self.num_layers
        )
        self.num_kv_heads: int = self.text_config.num_key_value_heads
        self.head_dim: int = getattr(self.text_config, "head_dim", None) or (
            self.text_config.hidden_size // self.text_config.num_attention_heads
        )
        self.image_token_id: int = self._image_token_id()

    # ---- loading ---------------------------------------------------------------------------
    @staticmethod
    def model_class():
        raise NotImplementedError

    def _image_token_id(self) -> int:
        raise NotImplementedError

    # ---- vision ----------------------------------------------------------------------------
    def split_pixels(self, batch) -> list[PixelInputs]:
        """Processor output (all images of one prompt) -> one PixelInputs per image."""
        raise NotImplementedError

    def encode_pixels(self, vision: nn.Module, items: list[PixelInputs]) -> list[ImageFeatures]:
        """Run the vision tower + projector on several images in one call."""
        raise NotImplementedError

    @property
    def num_deepstack(self) -> int:
        return 0

    # ---- text ------------------------------------------------------------------------------
    def embed(self, text: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return text.embed_tokens(input_ids)

    def positions(self, input_ids: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor],
                  grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        """Rope positions of one prompt [R, S] (R = 1, or 3 for mRoPE) and its rope delta:
        a token at cache index i >= S decodes at position i + delta."""
        n = input_ids.shape[-1]
        return torch.arange(n).view(1, n), 0

    def decode_positions(self, cache_index: torch.Tensor, rope_delta: torch.Tensor) -> torch.Tensor:
        """[B] cache indices -> position ids in the layout `rotary` takes, for one new token each."""
        return (cache_index + rope_delta).view(-1, 1)

    def batch_positions(self, per_prompt: list[torch.Tensor], width: int) -> torch.Tensor:
        """Stack [R, S_b] position rows, right-padded to width, in the layout `rotary` takes."""
        out = torch.zeros(per_prompt[0].shape[0], len(per_prompt), width, dtype=torch.long)
        for b, p in enumerate(per_prompt):
            out[:, b, : p.shape[1]] = p
        return out[0]

    def rotary(self, text: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple]:
        """Rotary (cos, sin) per layer type."""
        raise NotImplementedError

    def inject_visual(self, hidden: torch.Tensor, layer_idx: int, visual) -> torch.Tensor:
        """Hook after decoder layer `layer_idx` (Qwen3-VL deepstack); identity elsewhere."""
        return hidden

    def image_blocks(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Per token, the index of the image block it belongs to (-1 for text), for families whose
        image tokens attend to each other bidirectionally in prefill; None otherwise."""
        return None

    def sliding_window(self, layer_type: str) -> Optional[int]:
        return None

    @property
    def layer_windows(self) -> list[Optional[int]]:
        """Per layer, how many of the last keys its attention reaches (None: all of them)."""
        return [self.sliding_window(t) for t in self.layer_types]

    # ---- layer surgery for POP -------------------------------------------------------------
    @staticmethod
    def strip_to_kv_projection(layer: nn.Module) -> None:
        """Keep only what POP's independent KV projection needs of a skipped layer: its input
        norm, K/V projections and k_norm. Everything else is dropped from memory."""
        attn = layer.self_attn
        for name in ("q_proj", "o_proj", "q_norm"):
            if hasattr(attn, name):
                setattr(attn, name, None)
        for name in ("mlp", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            if hasattr(layer, name):
                setattr(layer, name, None)


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root
