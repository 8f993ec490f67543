"""Images for chat requests: a path, bytes, a PIL image or an http(s) URL, as an image_url part.

Local images travel inline as base64 data URLs (the server always accepts those); remote URLs
are sent as they are, for the server to fetch if it is configured to. Pillow is optional: it
is needed only for PIL images and for downscaling.
"""
from __future__ import annotations

import base64
import io
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]  # Any: PIL.Image.Image

# Magic bytes of the formats a VLM server is likely to decode.
_SIGNATURES: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


def sniff_mime(data: bytes) -> Optional[str]:
    """The image MIME type from the first bytes, or None when they are not a known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _SIGNATURES:
        if data.startswith(magic):
            return mime
    return None


def image_url(source: ImageSource, max_side: Optional[int] = None) -> str:
    """The URL to send for `source`: remote URLs unchanged, everything else as a data URL.

    max_side: shrink local images (aspect ratio kept) so neither side exceeds it; needs Pillow.
    """
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:")):
        return source  # the server fetches (or decodes) it; nothing to shrink here
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if _is_pil_image(source):
        pil: Any = source
        img = pil
        if max_side is not None and max(pil.size) > max_side:
            img = _shrunk(pil.copy(), max_side)  # never modify the caller's image
        data, mime = _encode_pil(img, pil.format)
    else:
        data, mime = _load(source)
        if max_side is not None:
            data, mime = _downscale(data, mime, max_side)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(source: ImageSource, max_side: Optional[int] = None) -> dict[str, Any]:
    """An OpenAI chat content part: {"type": "image_url", "image_url": {"url": ...}}."""
    return {"type": "image_url", "image_url": {"url": image_url(source, max_side)}}


def _load(source: ImageSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), None
    elif isinstance(source, (str, os.PathLike)):
        data, name = Path(source).read_bytes(), os.fspath(source)
    else:
        raise TypeError(f"unsupported image source {type(source).__name__}: use a path, bytes, a PIL image or a URL")
    if not data:
        raise ValueError(f"image {name or '<bytes>'} is empty")
    mime = sniff_mime(data) or (mimetypes.guess_type(name)[0] if name else None)
    if not mime or not mime.startswith("image/"):
        raise ValueError(f"image {name or '<bytes>'} is not in a recognised image format")
    return data, mime


def _is_pil_image(obj: Any) -> bool:
    # Whoever made a PIL image has imported PIL already: no need to import it to check.
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(obj, pil_image.Image)


def _require_pil(why: str) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            f"{why} needs Pillow, which is not installed: pip install 'popserve-client[images]'"
        ) from None
    return Image


def _downscale(data: bytes, mime: str, max_side: int) -> tuple[bytes, str]:
    Image = _require_pil(f"downscaling images (max_side={max_side})")
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data, mime  # already small enough: send the original bytes untouched
        fmt = img.format
        return _encode_pil(_shrunk(img, max_side), fmt)


def _shrunk(img: Any, max_side: int) -> Any:
    from PIL import Image

    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # in place; keeps the aspect ratio
    return img


def _encode_pil(img: Any, fmt: Optional[str]) -> tuple[bytes, str]:
    """JPEG sources stay JPEG (photos would balloon as PNG); everything else becomes PNG."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img = img if img.mode in ("RGB", "L") else img.convert("RGB")
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
    if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    img.save(buf, format="PNG")
    return buf.getvalue(), "image/png"
