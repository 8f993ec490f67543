"""VisionEncoder stage: PIL images -> image features. Holds the vision tower and projector only."""
from __future__ import annotations

from pathlib import Path

import torch

from .families import ImageFeatures, PixelInputs
from .loading import load_checkpoint, param_bytes, release, take


class VisionEncoder:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "cpu"):
        from transformers import AutoProcessor

        loaded = load_checkpoint(model, dtype, device)
        self.family = loaded.family
        self.fingerprint = loaded.fingerprint
        self.device = loaded.device
        self.vision = take(loaded.model, self.family.vision_paths, self.device)
        self.image_processor = AutoProcessor.from_pretrained(loaded.model_dir).image_processor
        release(loaded)

    def param_bytes(self) -> int:
        return param_bytes(self.vision)

    def preprocess(self, images: list) -> list[PixelInputs]:
        return self.family.split_pixels(self.image_processor(images=images, return_tensors="pt"))

    @torch.inference_mode()
    def encode(self, images: list) -> list[ImageFeatures]:
        """Several PIL images in one batched call."""
        return self.encode_pixels(self.preprocess(images))

    @torch.inference_mode()
    def encode_pixels(self, items: list[PixelInputs]) -> list[ImageFeatures]:
        if not items:
            return []
        return [ImageFeatures(f.data.cpu() if self.device.type != "cpu" else f.data, f.grid_thw)
                for f in self.family.encode_pixels(self.vision, items)]
