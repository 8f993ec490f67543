"""Streaming: SSE parsing, typed deltas, usage, and streams that stop early."""
from __future__ import annotations

import json

import httpx
import pytest

from popserve_client import (
    AsyncClient,
    Client,
    IncompleteStreamError,
    NotFoundError,
    ServiceUnavailableError,
)
from popserve_client._sse import SSEDecoder, iter_sse_data

BASE_URL = "http://popserve.test"  # where the `server` fixture listens
CHAT = "/v1/chat/completions"
SSE_HEADERS = {"content-type": "text/event-stream", "x-request-id": "req-stream"}


class DroppedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that sends some bytes and then loses the connection."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    def __iter__(self):
        yield from self.parts
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def __aiter__(self):
        for part in self.parts:
            yield part
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def sse_response(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body, headers=SSE_HEADERS)


@pytest.fixture
def client(policy):
    with Client(BASE_URL, retry=policy) as c:
        yield c


# ---- SSE framing ------------------------------------------------------------------------------
def test_decoder_joins_multiline_data_and_skips_comments_and_other_fields():
    lines = [": keep-alive", "", "event: message", "id: 7", "retry: 100", "data: {\"a\":", "data: 1}", "", "data:x", ""]
    assert list(iter_sse_data(lines)) == ['{"a":\n1}', "x"]


def test_decoder_flushes_an_event_missing_its_final_blank_line():
    decoder = SSEDecoder()
    assert decoder.feed("data: [DONE]") is None
    assert decoder.flush() == "[DONE]"
    assert decoder.flush() is None


# ---- complete streams ------------------------------------------------------------------------
def test_stream_yields_typed_deltas_with_usage_on_the_last(server, client, sse, stream_of):
    server.post(CHAT).mock(return_value=sse_response(sse(*stream_of("The", " cat", " sat"))))
    with client.chat_stream(prompt="hi", model="tiny-vl") as stream:
        deltas = list(stream)
    assert "".join(d.text for d in deltas) == "The cat sat"
    assert [d.text for d in deltas if d.text] == ["The", " cat", " sat"]
    assert deltas[0].role == "assistant"
    assert [d.finish_reason for d in deltas].count("stop") == 1
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert all(d.usage is None for d in deltas[:-1])
    assert all(d.request_id == "req-stream" and d.id == "chatcmpl-1" for d in deltas)
    assert stream.text == "The cat sat"
    assert stream.finish_reason == "stop"
    assert stream.usage.total_tokens == 14
    assert stream.request_id == "req-stream"


def test_stream_request_asks_for_usage(server, client, sse, stream_of):
    route = server.post(CHAT).mock(return_value=sse_response(sse(*stream_of("x"))))
    list(client.chat_stream(prompt="hi", model="tiny-vl", max_tokens=5))
    body = json.loads(route.calls.last.request.content)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5


def test_crlf_framing_and_keepalive_comments(server, client, stream_of):
    events = [json.dumps(c) for c in stream_of("a", "b")]
    body = ": ping\r\n\r\n" + "".join(f"data: {e}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    server.post(CHAT).mock(return_value=sse_response(body.encode()))
    assert "".join(d.text for d in client.chat_stream(prompt="hi", model="m")) == "ab"


def test_events_after_done_are_ignored(server, client, sse, stream_of, chunk):
    body = sse(*stream_of("ok")) + sse(chunk(content="GARBAGE"), done=False)
    server.post(CHAT).mock(return_value=sse_response(body))
    assert "".join(d.text for d in client.chat_stream(prompt="hi", model="m")) == "ok"


def test_finish_reason_without_done_is_accepted(server, client, sse, chunk):
    # Some servers close after the finishing chunk; the answer is still known to be complete.
    body = sse(chunk(content="hi"), chunk(finish_reason="length"), done=False)
    server.post(CHAT).mock(return_value=sse_response(body))
    stream = client.chat_stream(prompt="hi", model="m")
    assert "".join(d.text for d in stream) == "hi"
    assert stream.finish_reason == "length"


# ---- cut streams -------------------------------------------------------------------------------
def test_body_ending_without_done_or_finish_reason_raises(server, client, sse, chunk):
    server.post(CHAT).mock(return_value=sse_response(sse(chunk(content="The"), chunk(content=" ca"), done=False)))
    stream = client.chat_stream(prompt="hi", model="m")
    got = []
    with pytest.raises(IncompleteStreamError) as info:
        for delta in stream:
            got.append(delta.text)
    assert got == ["The", " ca"]  # what arrived was delivered, then the stream failed loudly
    assert info.value.partial_text == "The ca"
    assert info.value.request_id == "req-stream"


def test_truncated_event_raises(server, client, sse, chunk):
    body = sse(chunk(content="The"), done=False) + b'data: {"id": "chatcmpl-1", "choi'
    server.post(CHAT).mock(return_value=sse_response(body))
    with pytest.raises(IncompleteStreamError, match="undecodable"):
        list(client.chat_stream(prompt="hi", model="m"))


def test_connection_drop_after_first_token_raises_and_is_not_retried(server, client, clock, sse, chunk):
    dropped = DroppedStream(sse(chunk(content="The"), done=False))
    route = server.post(CHAT).mock(return_value=httpx.Response(200, stream=dropped, headers=SSE_HEADERS))
    stream = client.chat_stream(prompt="hi", model="m")
    assert next(stream).text == "The"
    with pytest.raises(IncompleteStreamError) as info:
        next(stream)
    assert "peer closed" in str(info.value)
    assert info.value.partial_text == "The"
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert route.call_count == 1  # retries are configured (policy fixture), yet none happened
    assert clock.sleeps == []


def test_connection_drop_after_finish_but_before_done_still_raises(server, client, sse, chunk):
    body = sse(chunk(content="ok"), chunk(finish_reason="stop"), done=False)
    server.post(CHAT).mock(return_value=httpx.Response(200, stream=DroppedStream(body), headers=SSE_HEADERS))
    with pytest.raises(IncompleteStreamError):
        list(client.chat_stream(prompt="hi", model="m"))


def test_read_timeout_mid_stream_raises_incomplete(server, client):
    class Stalled(httpx.SyncByteStream):
        def __iter__(self):
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
            raise httpx.ReadTimeout("timed out")

    server.post(CHAT).mock(return_value=httpx.Response(200, stream=Stalled(), headers=SSE_HEADERS))
    with pytest.raises(IncompleteStreamError, match="timed out"):
        list(client.chat_stream(prompt="hi", model="m"))


# ---- errors ------------------------------------------------------------------------------------
def test_in_stream_error_event_raises_typed_error(server, client, clock, sse, chunk):
    error = {"error": {"message": "decode replica died", "type": "service_unavailable", "param": None, "code": 503}}
    route = server.post(CHAT).mock(return_value=sse_response(sse(chunk(content="The"), error, done=False)))
    stream = client.chat_stream(prompt="hi", model="m")
    assert next(stream).text == "The"
    with pytest.raises(ServiceUnavailableError) as info:
        next(stream)
    assert info.value.message == "decode replica died"
    assert info.value.request_id == "req-stream"
    assert route.call_count == 1 and clock.sleeps == []


def test_error_status_before_the_stream_starts_is_typed(server, client):
    error = {"message": "The model `x` does not exist", "type": "invalid_request_error", "code": "model_not_found"}
    body = {"error": error}
    route = server.post(CHAT).mock(return_value=httpx.Response(404, json=body, headers={"x-request-id": "r404"}))
    stream = client.chat_stream(prompt="hi", model="x")
    with pytest.raises(NotFoundError) as info:
        next(stream)
    assert info.value.request_id == "r404" and info.value.code == "model_not_found"
    assert route.call_count == 1


def test_503_before_any_token_is_retried(server, client, clock, sse, stream_of):
    route = server.post(CHAT).mock(
        side_effect=[httpx.Response(503, json={"error": {"message": "busy"}}), sse_response(sse(*stream_of("ok")))]
    )
    assert "".join(d.text for d in client.chat_stream(prompt="hi", model="m")) == "ok"
    assert route.call_count == 2
    assert clock.sleeps == [0.5]


def test_closing_a_stream_early_releases_it(server, client, sse, stream_of):
    server.post(CHAT).mock(return_value=sse_response(sse(*stream_of("a", "b", "c"))))
    with client.chat_stream(prompt="hi", model="m") as stream:
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


# ---- async ------------------------------------------------------------------------------------
async def test_async_stream_yields_deltas_and_usage(server, policy, sse, stream_of):
    server.post(CHAT).mock(return_value=sse_response(sse(*stream_of("Hel", "lo"))))
    async with AsyncClient(BASE_URL, retry=policy) as client:
        stream = client.chat_stream(prompt="hi", model="m")
        deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas) == "Hello"
    assert deltas[-1].usage.completion_tokens == 2
    assert stream.request_id == "req-stream"
    assert stream.finish_reason == "stop"


async def test_async_stream_cut_raises_and_is_not_retried(server, policy, clock, sse, chunk):
    dropped = DroppedStream(sse(chunk(content="Hel"), done=False))
    route = server.post(CHAT).mock(return_value=httpx.Response(200, stream=dropped, headers=SSE_HEADERS))
    async with AsyncClient(BASE_URL, retry=policy) as client:
        got = []
        with pytest.raises(IncompleteStreamError) as info:
            async for delta in client.chat_stream(prompt="hi", model="m"):
                got.append(delta.text)
    assert got == ["Hel"]
    assert info.value.partial_text == "Hel"
    assert route.call_count == 1 and clock.sleeps == []


async def test_async_stream_without_done_raises(server, policy, sse, chunk):
    server.post(CHAT).mock(return_value=sse_response(sse(chunk(content="Hel"), done=False)))
    async with AsyncClient(BASE_URL, retry=policy) as client:
        with pytest.raises(IncompleteStreamError):
            async for _ in client.chat_stream(prompt="hi", model="m"):
                pass
