"""Load one stage's share of a checkpoint through transformers' own loading code.

Each stage keeps only the modules it runs and lets the rest be freed: the encoder the vision tower
and projector, prefill the embedding and (for skipped layers) norm + K/V projections, decode the
text model and LM head. The same code loads the tiny checkpoints here and real Qwen3-VL / Gemma-3
checkpoints from a directory or hub id.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, check_weights, model_fingerprint, read_config, resolve_model_dir
from .families import Family, family_for
from .families.base import get_module

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    family: Family
    model: nn.Module  # the HF model, to be pruned by the caller
    model_dir: Path
    fingerprint: str
    dtype: torch.dtype
    device: torch.device


def cpu_has_native_half() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it torch emulates
    bf16 matmuls, several times slower than float32 (measured: README, "dtype on CPUs")."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(name: str, config_dtype, device: str = "cpu") -> torch.dtype:
    """'auto' = the checkpoint's dtype, except on CPUs that would only emulate bf16/fp16:
    there the weights are upcast to float32 for compute (same model, faster, more memory)."""
    if name != "auto":
        return _DTYPES[name]
    if isinstance(config_dtype, str) and config_dtype in _DTYPES:
        dt = _DTYPES[config_dtype]
    else:
        dt = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    if str(device).startswith("cpu") and dt in (torch.bfloat16, torch.float16) and not cpu_has_native_half():
        return torch.float32
    return dt


def load_checkpoint(model: str | Path, dtype: str = "auto", device: str = "cpu") -> Loaded:
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model)
    raw = read_config(model_dir)
    if raw.get("model_type") not in ("qwen3_vl", "gemma3"):
        raise CheckpointError(
            f"{model_dir}: unsupported model_type {raw.get('model_type')!r}; popserve serves "
            "Qwen3-VL (qwen3_vl) and Gemma-3 (gemma3) image-text checkpoints")
    check_weights(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise CheckpointError(f"{model_dir}/config.json cannot be parsed by transformers: {exc}") from exc
    family = family_for(config)
    dt = torch_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("dtype"),
                     device)
    try:
        hf_model = family.model_class().from_pretrained(model_dir, dtype=dt, attn_implementation="sdpa")
    except Exception as exc:
        raise CheckpointError(f"{model_dir}: cannot load weights: {exc}") from exc
    return Loaded(family, hf_model.eval(), model_dir, model_fingerprint(model_dir), dt, torch.device(device))


def take(root: nn.Module, paths: tuple[str, ...], device: torch.device) -> nn.Module:
    """A container holding only root's submodules at `paths` (named by their last component)."""
    box = nn.Module()
    for path in paths:
        setattr(box, path.rsplit(".", 1)[-1], get_module(root, path))
    return box.to(device)


def release(*objs) -> None:
    del objs
    gc.collect()


def param_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the distinct parameter tensors held (tied weights counted once)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            key = (p.data_ptr(), p.numel())
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def column_major_linears(*modules: nn.Module) -> None:
    """Store every Linear weight as the transpose of a contiguous [in, out] matrix: same values,
    shape and results, but F.linear then hands MKL a row-major Wᵀ, whose one-row product (decode
    at batch 1) runs about 2x faster on CPU (bench: 56 -> 30 ms for 314 MB of weights; no change
    at 8+ rows). CPU only: GPUs have their own preferred layouts."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()
