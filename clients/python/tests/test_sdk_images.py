"""Images: data URLs with the right MIME type, remote URLs as they are, optional downscaling."""
from __future__ import annotations

import base64
import io
import json
import sys

import httpx
import pytest
from PIL import Image

from popserve_client import Client, image_part, image_url
from popserve_client.images import sniff_mime

BASE_URL = "http://popserve.test"  # where the `server` fixture listens


def decode(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    assert header.startswith("data:") and header.endswith(";base64")
    return header[len("data:") : -len(";base64")], base64.b64decode(payload)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def test_path_becomes_a_png_data_url_with_the_same_bytes(tmp_path, make_png):
    png = make_png()
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    for source in (path, str(path)):
        mime, data = decode(image_url(source))
        assert mime == "image/png"
        assert data == png


def test_mime_comes_from_magic_bytes_not_the_file_name(tmp_path, make_jpeg):
    path = tmp_path / "photo.png"  # misnamed
    path.write_bytes(make_jpeg())
    assert decode(image_url(path))[0] == "image/jpeg"


@pytest.mark.parametrize(
    "head, mime",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"GIF89a\x01\x00", "image/gif"),
        (b"GIF87a\x01\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM\x36\x00\x00\x00", "image/bmp"),
        (b"II*\x00\x08\x00", "image/tiff"),
        (b"hello world", None),
    ],
)
def test_sniff_mime(head, mime):
    assert sniff_mime(head) == mime


def test_bytes_are_accepted(make_jpeg):
    jpeg = make_jpeg()
    for source in (jpeg, bytearray(jpeg), memoryview(jpeg)):
        assert decode(image_url(source)) == ("image/jpeg", jpeg)


def test_unknown_bytes_are_refused():
    with pytest.raises(ValueError, match="not in a recognised image format"):
        image_url(b"definitely not an image")
    with pytest.raises(ValueError, match="empty"):
        image_url(b"")


def test_unknown_content_falls_back_to_the_file_extension(tmp_path):
    # A format the sniffer does not know, but whose name says it is an image.
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x00\x00\x00\x1cftypavif")
    assert decode(image_url(path))[0] == "image/png"
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\x00\x00\x00\x1cftypavif")
    with pytest.raises(ValueError):
        image_url(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        image_url(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", "http://example.com/a.jpg", "data:image/png;base64,AAAA"]
)
def test_urls_are_sent_as_they_are(url):
    assert image_url(url) == url
    assert image_url(url, max_side=10) == url
    assert image_part(url) == {"type": "image_url", "image_url": {"url": url}}


def test_pil_image_is_encoded_losslessly():
    img = Image.new("RGBA", (5, 3), (1, 2, 3, 4))
    mime, data = decode(image_url(img))
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as back:
        assert back.size == (5, 3) and back.getpixel((0, 0)) == (1, 2, 3, 4)


def test_cmyk_pil_image_is_converted_for_png():
    mime, data = decode(image_url(Image.new("CMYK", (4, 4))))
    assert mime == "image/png" and size_of(data) == (4, 4)


def test_downscale_keeps_aspect_ratio(make_png):
    mime, data = decode(image_url(make_png(400, 200), max_side=100))
    assert mime == "image/png"
    assert size_of(data) == (100, 50)


def test_downscale_keeps_jpeg_as_jpeg(make_jpeg):
    mime, data = decode(image_url(make_jpeg(300, 600), max_side=60))
    assert mime == "image/jpeg"
    assert size_of(data) == (30, 60)


def test_small_images_are_sent_untouched(make_png):
    png = make_png(40, 30)
    assert decode(image_url(png, max_side=100))[1] == png


def test_downscale_of_a_pil_image_leaves_the_callers_image_alone():
    img = Image.new("RGB", (200, 100))
    _, data = decode(image_url(img, max_side=50))
    assert size_of(data) == (50, 25)
    assert img.size == (200, 100)


def test_downscale_without_pillow_says_what_to_install(monkeypatch, make_png):
    png = make_png()
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"needs Pillow.*pip install 'popserve-client\[images\]'"):
        image_url(png, max_side=10)
    # Without downscaling, Pillow is not needed at all.
    assert decode(image_url(png))[0] == "image/png"


def test_invalid_max_side_is_refused(make_png):
    with pytest.raises(ValueError, match="max_side"):
        image_url(make_png(), max_side=0)


def test_prompt_with_images_builds_an_openai_user_message(server, tmp_path, make_png, completion):
    path = tmp_path / "a.png"
    path.write_bytes(make_png(400, 100))
    route = server.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=completion()))
    with Client(BASE_URL, image_max_side=200) as client:
        client.chat(prompt="What is this?", images=[path, "https://example.com/b.jpg"], model="m")
    (message,) = json.loads(route.calls.last.request.content)["messages"]
    assert message["role"] == "user"
    first, second, text = message["content"]
    assert first["type"] == "image_url" and first["image_url"]["url"].startswith("data:image/png;base64,")
    assert size_of(decode(first["image_url"]["url"])[1]) == (200, 50)  # the client-wide max side applied
    assert second == {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}
    assert text == {"type": "text", "text": "What is this?"}
