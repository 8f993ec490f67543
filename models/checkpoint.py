"""Finding, validating and fingerprinting checkpoints (local directories or hub ids)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_MODEL_TYPE_TO_FAMILY = {"qwen3_vl": "qwen3-vl", "gemma3": "gemma3"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or of an unsupported architecture."""


def shipped_models_dir() -> Path:
    """Checkpoints committed with the project (see README: trained models)."""
    return Path(__file__).resolve().parent / "checkpoints"


def default_model_dir() -> Path:
    """The model `popserve serve` uses when none is given: a shipped checkpoint when the project
    ships one, else a tiny random Qwen3-VL built locally once (works offline)."""
    override = os.environ.get("POPSERVE_DEFAULT_MODEL")
    if override:
        return Path(override)
    shipped = shipped_models_dir() / "default"
    if (shipped / "config.json").exists():
        return shipped
    from popserve.models.tiny import make_tiny

    cache = Path(os.environ.get("POPSERVE_CACHE", Path.home() / ".cache" / "popserve"))
    target = cache / "tiny-qwen3-vl"
    if not (target / "config.json").exists():
        make_tiny("qwen3-vl", "tiny", target)
    return target


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; a hub id through huggingface_hub's cache/download."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
        return path
    if str(model).startswith(("/", ".", "~")) or os.sep in str(model) and str(model).count("/") > 1:
        raise CheckpointError(f"checkpoint directory {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model)))
    except Exception as exc:  # offline, unknown id, gated...
        raise CheckpointError(f"cannot find model {model!r} locally or on the hub: {exc}") from exc


def read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{model_dir} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object (got {type(config).__name__})")
    return config


def detect_family(model: str | os.PathLike) -> str:
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPE_TO_FAMILY:
        raise CheckpointError(
            f"{model_dir}: unsupported model_type {model_type!r} in config.json; popserve serves "
            "Qwen3-VL (qwen3_vl) and Gemma-3 (gemma3) image-text checkpoints"
        )
    return _MODEL_TYPE_TO_FAMILY[model_type]


def check_weights(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise CheckpointError(f"{model_dir} has no weight files (*.safetensors)")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors_header(f)
    return files


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (corrupt safetensors file)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path} has a corrupt safetensors header")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {exc}") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: header promises {end} data bytes")


_SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor


def _sample_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of a weight file that identify its contents: the whole safetensors header plus
    a few KiB of every tensor (a re-trained tensor differs there), or for other formats the first
    64 KiB and evenly spaced windows."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        step = max(size // 16, 1)
        return [(0, min(size, 1 << 16))] + [(o, min(size, o + _SAMPLE)) for o in range(0, size, step)]
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    base, ranges = 8 + n, [(0, 8 + n)]
    for name in sorted(k for k in header if k != "__metadata__"):
        a, b = (base + o for o in header[name]["data_offsets"])
        for start in (a, (a + b - _SAMPLE) // 2, b - _SAMPLE):
            start = max(a, start)
            ranges.append((start, min(b, start + _SAMPLE)))
    return ranges


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: its config, the names, sizes and headers of its weight files, and
    a sample of every tensor's bytes.

    Cheap (a few KiB per tensor are read) yet distinct for different models or re-trained weights
    of the same architecture (hashing only the first 64 KiB of a file missed those)."""
    h = hashlib.sha256()
    h.update(json.dumps(read_config(model_dir), sort_keys=True).encode())
    for f in check_weights(model_dir):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            for start, end in _sample_ranges(f):
                fh.seek(start)
                h.update(fh.read(end - start))
    return h.hexdigest()[:16]
