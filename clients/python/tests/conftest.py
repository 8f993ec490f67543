"""Shared fixtures: a fake clock for retries, a mocked server (respx), and tiny images."""
from __future__ import annotations

import io
import json

import pytest
import respx

from popserve_client import RetryPolicy, _http, _retry

BASE_URL = "http://popserve.test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds a virtual environment and installs from PyPI")


class FakeClock:
    """Stands in for time.monotonic and (async) sleep, so backoff is measured, not waited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_retry, "_monotonic", fake.monotonic)
    monkeypatch.setattr(_http, "_sleep", fake.sleep)
    monkeypatch.setattr(_http, "_async_sleep", fake.async_sleep)
    return fake


@pytest.fixture
def policy() -> RetryPolicy:
    """No jitter, so the expected waits are exact: 0.5, 1, 2, 4 ..."""
    return RetryPolicy(
        max_retries=3, initial_backoff=0.5, multiplier=2.0, max_backoff=8.0, jitter=0.0, total_budget=60.0
    )


@pytest.fixture
def server():
    """A mocked popserve at BASE_URL; every request not routed explicitly fails the test."""
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as mock:
        yield mock


# Helpers are handed out as fixtures: test modules cannot reliably import a conftest.py.
def _png(width: int = 8, height: int = 6, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 8, height: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 240)).save(buf, format="JPEG")
    return buf.getvalue()


def _completion(text: str = "a red square", finish_reason: str = "stop", completion_tokens: int = 3) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "tiny-vl",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": completion_tokens, "total_tokens": 11 + completion_tokens},
    }


def _chunk(content=None, finish_reason=None, role=None, usage=None, choices=True) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "tiny-vl"}
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _sse(*events, done: bool = True) -> bytes:
    """An SSE body: each event (a dict, or a raw string) as `data: ...` and a blank line."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


def _stream_of(*tokens: str, finish_reason: str = "stop") -> list[dict]:
    """The chunks a server sends for `tokens`: role, one per token, finish, then usage."""
    usage = {"prompt_tokens": 11, "completion_tokens": len(tokens), "total_tokens": 11 + len(tokens)}
    return (
        [_chunk(role="assistant", content="")]
        + [_chunk(content=t) for t in tokens]
        + [_chunk(finish_reason=finish_reason), _chunk(usage=usage, choices=False)]
    )


@pytest.fixture
def make_png():
    return _png


@pytest.fixture
def make_jpeg():
    return _jpeg


@pytest.fixture
def completion():
    return _completion


@pytest.fixture
def chunk():
    return _chunk


@pytest.fixture
def sse():
    return _sse


@pytest.fixture
def stream_of():
    return _stream_of
