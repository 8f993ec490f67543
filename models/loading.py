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
    bf16 matmuls, several times slower than float32 (measured: README, "Configuration")."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The oldest NVIDIA driver each CUDA major version runs on (NVIDIA's compatibility table).
MIN_DRIVER = {12: 525, 13: 580}
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"  # there while the kernel driver is loaded


def unusable_gpu(cuda_version: str | None, driver_file: str | None = None) -> str | None:
    """Why torch cannot use the NVIDIA GPU this machine has (its kernel driver is loaded), or None
    where there is none: so that `device: auto` does not fall back to the CPU without a word.
    `cuda_version` is torch.version.cuda (None in a CPU-only build)."""
    try:
        text = Path(driver_file or NVIDIA_DRIVER_FILE).read_text()
    except OSError:
        return None  # no NVIDIA driver loaded: no GPU to miss
    found = next((w for w in text.split() if w.count(".") >= 1 and w.split(".")[0].isdigit()), None)
    driver = f"NVIDIA driver {found}" if found else "an NVIDIA driver"
    if cuda_version is None:
        return f"{driver} is loaded, but this torch is a CPU-only build"
    need = MIN_DRIVER.get(int(cuda_version.split(".")[0]))
    if found and need and int(found.split(".")[0]) < need:
        return f"{driver} is older than torch's CUDA {cuda_version} needs (driver {need} or newer)"
    return f"{driver} is loaded, but torch finds no usable GPU (CUDA_VISIBLE_DEVICES, permissions?)"


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
        total += sum(x.packed.numel() * x.packed.element_size() for x in m.modules() if isinstance(x, PackedLinear))
    return total


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is prepacked once into oneDNN's blocked layout (CPU inference).
    Same results bit for bit; a bf16 product of 1-16 rows (a decode step) reads the weights
    1.6-1.7x faster than F.linear's (bench shape, AVX-512 BF16, one core: 13.5 vs 7.9 GB/s at 1 row,
    10.9 vs 6.4 at 8): decode steps 1.1-1.36x faster, prefill 2-7% (bench/cpu_layouts.py). PyTorch's
    own CPU inductor emits these two ops for frozen bf16 Linears."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _can_pack(dtype: torch.dtype) -> bool:
    """oneDNN computes this dtype natively here (and this torch has the ops: they are internal)."""
    try:
        ops = torch.ops.mkldnn
        ops._reorder_linear_weight, ops._linear_pointwise  # noqa: B018 - raise if missing
        # bf16 only: float16 would take the same path on CPUs with AVX512-FP16, not measured here.
        return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def fast_cpu_linears(*modules: nn.Module) -> tuple[nn.Module, ...]:
    """Lay out every Linear's weight for CPU inference (same values, shapes and results; GPUs have
    their own layouts), mainly for the decode step's few-row products. Returns the modules, a
    Linear given at the top level replaced by its packed form.
    - bf16 where oneDNN computes it natively: PackedLinear (above);
    - otherwise (float32): the weight stored as the transpose of a contiguous [in, out] matrix, so F.linear
      hands MKL a row-major Wᵀ, whose one-row product runs about 2x faster (AVX2 host: 56 -> 30 ms
      for 314 MB of weights; no change at 8+ rows)."""
    # A weight tied to an embedding (Gemma-3's LM head) stays as it is: packing would copy it.
    tied = {p.data_ptr() for module in modules for m in module.modules() if not isinstance(m, nn.Linear)
            for p in m.parameters(recurse=False)}

    def fast(linear: nn.Linear) -> nn.Module:
        if linear.weight.data_ptr() in tied:
            return linear
        if _can_pack(linear.weight.dtype):
            return PackedLinear(linear)
        linear.weight.data = linear.weight.data.t().contiguous().t()
        return linear

    for module in modules:
        for parent in list(module.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, fast(child))
    return tuple(fast(m) if isinstance(m, nn.Linear) else m for m in modules)
