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
from qwen_vl_utils.vision_process import to_rgb

from .config import Limits, Media
from .errors import BadRequest, PayloadTooLarge

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names

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
        # Only the formats the API names: each of Pillow's other decoders (TIFF, PSD, ...) is more
        # code that untrusted bytes could reach. Lazy: reads the header only.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
        # Transparent pixels onto white, as qwen-vl-utils does (a bare convert("RGB") keeps whatever
        # colour they happen to hold).
        if img.mode != "RGBA" and (img.mode in ("LA", "PA") or "transparency" in img.info):
            img = img.convert("RGBA")
        img = to_rgb(img)
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
    if len(payload.rstrip("=")) * 3 // 4 > limits.max_image_bytes:  # checked before decoding the base64
        raise PayloadTooLarge(f"image exceeds {limits.max_image_bytes} bytes", param="messages",
                              code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image data URL is not valid base64", param="messages", code="invalid_base64") from None
    return _decode(data, limits, "image")


# ---- remote images (off by default) -------------------------------------------------------------
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "metadata.azure.internal"}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(addr: str) -> bool:
    """True only for globally routable unicast addresses. IPv4 embedded in IPv6 (mapped, NAT64,
    6to4) is judged as the IPv4 address it reaches, so ::ffff:127.0.0.1 or 64:ff9b::a9fe:a9fe
    (169.254.169.254 through a NAT64 gateway) are refused too."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour:
            ip = ip.sixtofour
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


_public = is_public_address  # the old name


async def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (one lookup; the fetch then connects to a vetted one)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


@dataclass
class VettedURL:
    url: str
    host: str
    port: int
    address: str  # the resolved address that was checked; the connection goes there and nowhere else


async def check_url(url: str, media: Media) -> VettedURL:
    """Refuse non-http(s) schemes, hosts off the allowlist, and any host resolving to a
    loopback, private, link-local (cloud metadata) or otherwise non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadRequest(f"image URL scheme {parts.scheme!r} is not allowed (http, https only)",
                         param="messages", code="invalid_image_url")
    try:
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number or out of range
        raise BadRequest("image URL has an invalid port", param="messages", code="invalid_image_url") from None
    if not host:
        raise BadRequest("image URL has no host", param="messages", code="invalid_image_url")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("image URLs must not carry credentials", param="messages", code="invalid_image_url")
    if media.allowed_hosts and host not in {h.lower() for h in media.allowed_hosts}:
        raise BadRequest(f"image host {host!r} is not in the allowlist", param="messages", code="host_not_allowed")
    if host in _METADATA_HOSTS:
        raise BadRequest(f"image host {host!r} is not allowed", param="messages", code="host_not_allowed")
    try:
        addrs = await resolve_host(host, port)
    except (socket.gaierror, UnicodeError, ValueError):
        raise BadRequest(f"image host {host!r} does not resolve", param="messages", code="invalid_image_url") from None
    try:
        public = bool(addrs) and all(is_public_address(a) for a in addrs)
    except ValueError:
        public = False
    if not public:
        raise BadRequest(f"image host {host!r} resolves to a non-public address; refused",
                         param="messages", code="host_not_allowed")
    return VettedURL(url, host, port, addrs[0])


def _pinned(v: VettedURL) -> tuple[httpx.URL, dict, dict]:
    """The request aimed at the vetted address itself (no second DNS lookup, so a DNS rebinding
    answer cannot redirect the connection), with the original Host header and TLS SNI/hostname."""
    target = httpx.URL(v.url).copy_with(host=v.address)
    default = 443 if target.scheme == "https" else 80
    headers = {"host": v.host if v.port == default else f"{v.host}:{v.port}",
               "accept": "image/*", "accept-encoding": "identity"}
    ext = {"sni_hostname": v.host} if target.scheme == "https" else {}
    return target, headers, ext


async def fetch_image(url: str, media: Media, limits: Limits) -> LoadedImage:
    """One deadline (fetch_timeout_s) covers DNS, every redirect hop and the whole body."""
    try:
        data = await asyncio.wait_for(_fetch(url, media, limits.max_image_bytes), media.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"image fetch took longer than {media.fetch_timeout_s:g}s", param="messages",
                         code="image_fetch_timeout") from None
    except httpx.HTTPError as exc:
        raise BadRequest(f"image fetch failed: {exc.__class__.__name__}", param="messages",
                         code="image_fetch_failed") from None
    return await asyncio.to_thread(_decode, data, limits, "image")


async def _fetch(url: str, media: Media, cap: int) -> bytes:
    # trust_env=False: no HTTP(S)_PROXY from the environment (a proxy would reach what we refuse).
    async with httpx.AsyncClient(timeout=media.fetch_timeout_s, follow_redirects=False, trust_env=False,
                                 verify=True) as client:
        for _ in range(media.max_redirects + 1):
            vetted = await check_url(url, media)  # again on every redirect hop
            data = await _read_capped(client, vetted, cap)
            if isinstance(data, str):  # a redirect target
                if not data:
                    raise BadRequest("image redirect without a Location", param="messages",
                                     code="image_fetch_failed")
                url = urljoin(url, data)
                continue
            return data
    raise BadRequest("too many image redirects", param="messages", code="image_fetch_failed")


async def _read_capped(client: httpx.AsyncClient, vetted: VettedURL, cap: int) -> bytes | str:
    target, headers, ext = _pinned(vetted)
    async with client.stream("GET", target, headers=headers, extensions=ext) as resp:
        if resp.is_redirect:
            return resp.headers.get("location", "")
        if resp.status_code != 200:
            raise BadRequest(f"image fetch returned HTTP {resp.status_code}", param="messages",
                             code="image_fetch_failed")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:  # refused before reading the body
            raise PayloadTooLarge(f"image is {declared} bytes; the limit is {cap}", param="messages",
                                  code="image_too_large")
        buf = bytearray()
        async for chunk in resp.aiter_raw():
            buf += chunk
            if len(buf) > cap:  # cut at the cap, whatever the server claimed
                raise PayloadTooLarge(f"image exceeds {cap} bytes", param="messages", code="image_too_large")
        return bytes(buf)


async def load_image(url: str, media: Media, limits: Limits) -> LoadedImage:
    # Decoding runs in a worker thread: a large image must not stall the ingress's event loop.
    if url.startswith("data:"):
        return await asyncio.to_thread(decode_data_url, url, limits)
    if not media.allow_remote_images:
        raise BadRequest("only data: image URLs are accepted (remote image fetch is disabled in this "
                         "server's config)", param="messages", code="remote_images_disabled")
    return await fetch_image(url, media, limits)
