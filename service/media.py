"""Images from requests: data URLs always, http(s) only when enabled, never from private networks.

Every image is checked before it is decoded in full: byte cap, format sniffed by PIL from the
header, and a pixel cap on the header's claimed size (a 20000x20000 PNG is refused while only its
header has been read). Images above `max_image_pixels` are downscaled (aspect ratio kept).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from .config import Limits, Media
from .errors import BadRequest, PayloadTooLarge

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable cap before decoding


@dataclass
class LoadedImage:
    image: Image.Image
    digest: str  # content hash of the bytes, for the encoder's feature cache


def _decode(data: bytes, limits: Limits, what: str) -> LoadedImage:
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}",
                              param="messages", code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Exception:
        raise BadRequest(f"{what} is not a supported image (PNG, JPEG, WebP, GIF, BMP)",
                         param="messages", code="invalid_image") from None
    w, h = img.size
    if w * h > limits.max_decoded_pixels:
        raise BadRequest(f"{what} is {w}x{h} pixels; images over {limits.max_decoded_pixels} pixels are "
                         "refused before decoding", param="messages", code="image_too_many_pixels")
    if w < 1 or h < 1:
        raise BadRequest(f"{what} has no pixels", param="messages", code="invalid_image")
    try:
        img.load()
        img = img.convert("RGB")
    except Exception as exc:  # truncated or corrupt data
        raise BadRequest(f"{what} could not be decoded ({exc.__class__.__name__}: {exc})",
                         param="messages", code="invalid_image") from None
    if w * h > limits.max_image_pixels:  # documented: downscale, keep aspect
        scale = (limits.max_image_pixels / (w * h)) ** 0.5
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    return LoadedImage(img, hashlib.sha256(data).hexdigest())


def decode_data_url(url: str, limits: Limits) -> LoadedImage:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise BadRequest("image data URLs must look like data:image/<type>;base64,<data>",
                         param="messages", code="invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise PayloadTooLarge(f"image exceeds {limits.max_image_bytes} bytes", param="messages",
                              code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image data URL is not valid base64", param="messages", code="invalid_base64") from None
    return _decode(data, limits, "image")


# ---- remote images (off by default) -------------------------------------------------------------
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def _public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def check_url(url: str, media: Media) -> None:
    """Refuse non-http(s) schemes, hosts off the allowlist, and any host resolving to a
    loopback, private, link-local (cloud metadata) or otherwise non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadRequest(f"image URL scheme {parts.scheme!r} is not allowed (http, https only)",
                         param="messages", code="invalid_image_url")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise BadRequest("image URL has no host", param="messages", code="invalid_image_url")
    if media.allowed_hosts and host not in {h.lower() for h in media.allowed_hosts}:
        raise BadRequest(f"image host {host!r} is not in the allowlist", param="messages", code="host_not_allowed")
    if host in _METADATA_HOSTS:
        raise BadRequest(f"image host {host!r} is not allowed", param="messages", code="host_not_allowed")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise BadRequest(f"image host {host!r} does not resolve", param="messages", code="invalid_image_url") from None
    addrs = {info[4][0] for info in infos}
    if not addrs or not all(_public(a) for a in addrs):
        raise BadRequest(f"image host {host!r} resolves to a non-public address; refused",
                         param="messages", code="host_not_allowed")


async def fetch_image(url: str, media: Media, limits: Limits) -> LoadedImage:
    async with httpx.AsyncClient(timeout=media.fetch_timeout_s, follow_redirects=False) as client:
        for _ in range(media.max_redirects + 1):
            await check_url(url, media)  # again on every redirect hop
            try:
                data = await asyncio.wait_for(_read_capped(client, url, limits.max_image_bytes),
                                              media.fetch_timeout_s)
            except asyncio.TimeoutError:
                raise BadRequest("image fetch timed out", param="messages", code="image_fetch_timeout") from None
            except httpx.HTTPError as exc:
                raise BadRequest(f"image fetch failed: {exc.__class__.__name__}", param="messages",
                                 code="image_fetch_failed") from None
            if isinstance(data, str):  # a redirect target
                url = urljoin(url, data)
                continue
            return _decode(data, limits, "image")
    raise BadRequest("too many image redirects", param="messages", code="image_fetch_failed")


async def _read_capped(client: httpx.AsyncClient, url: str, cap: int) -> bytes | str:
    async with client.stream("GET", url) as resp:
        if resp.is_redirect:
            return resp.headers.get("location", "")
        if resp.status_code != 200:
            raise BadRequest(f"image fetch returned HTTP {resp.status_code}", param="messages",
                             code="image_fetch_failed")
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > cap:
                raise PayloadTooLarge(f"image exceeds {cap} bytes", param="messages", code="image_too_large")
        return bytes(buf)


async def load_image(url: str, media: Media, limits: Limits) -> LoadedImage:
    if url.startswith("data:"):
        return decode_data_url(url, limits)
    if not media.allow_remote_images:
        raise BadRequest("only data: image URLs are accepted (remote image fetch is disabled in this "
                         "server's config)", param="messages", code="remote_images_disabled")
    return await fetch_image(url, media, limits)
