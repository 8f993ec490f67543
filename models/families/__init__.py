"""Model-family adapters: the only place Qwen3-VL and Gemma-3 differ."""
from .base import Family, ImageFeatures, PixelInputs
from .gemma3 import Gemma3Family
from .qwen3_vl import Qwen3VLFamily

FAMILIES = {f.model_type: f for f in (Qwen3VLFamily, Gemma3Family)}


def family_for(config) -> Family:
    try:
        return FAMILIES[config.model_type](config)
    except KeyError:
        raise ValueError(
            f"unsupported model_type {config.model_type!r}; popserve serves {sorted(FAMILIES)}"
        ) from None


__all__ = ["Family", "ImageFeatures", "PixelInputs", "family_for", "FAMILIES"]
