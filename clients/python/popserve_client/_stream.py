"""Streamed chat completions: typed deltas, and a loud failure for a stream that stops early.

A stream is complete when the server sent `data: [DONE]`, or (for servers that omit it) at
least a finish_reason before closing. Anything else — a dropped connection, a read timeout,
an undecodable event, a body that just ends — raises IncompleteStreamError.
"""
from __future__ import annotations

import json
from typing import AsyncGenerator, Awaitable, Callable, Generator, Optional

import httpx
from pydantic import ValidationError

from ._http import connection_error
from ._sse import aiter_sse_data, iter_sse_data
from .errors import IncompleteStreamError, error_from_event, request_id_of
from .types import ChatCompletionChunk, StreamDelta, Usage


class StreamState:
    """What one stream has delivered so far; turns each event's data into a StreamDelta."""

    def __init__(self, request_id: Optional[str]) -> None:
        self.request_id = request_id
        self.id = ""
        self.parts: list[str] = []
        self.finish_reason: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.done = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, data: str) -> Optional[StreamDelta]:
        """The delta in one event; None for [DONE] and for events that carry nothing."""
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise self.incomplete(f"undecodable event {data[:200]!r}") from None
        if isinstance(payload, dict) and "error" in payload:
            raise error_from_event(payload, self.request_id)
        try:
            chunk = ChatCompletionChunk.model_validate(payload)
        except ValidationError as exc:
            raise self.incomplete(f"unexpected event {data[:200]!r}") from exc

        self.id = chunk.id or self.id
        self.usage = chunk.usage or self.usage
        choice = chunk.choices[0] if chunk.choices else None  # the server serves n=1
        if choice is None and chunk.usage is None:
            return None
        text = (choice.delta.content or "") if choice else ""
        logprobs = (choice.logprobs.content or []) if choice and choice.logprobs else []
        if not choice or choice.index == 0:  # text and finish_reason: the first choice's (n > 1: see delta.index)
            self.parts.append(text)
            if choice and choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return StreamDelta(
            text=text,
            role=choice.delta.role if choice else None,
            finish_reason=choice.finish_reason if choice else None,
            usage=chunk.usage,
            logprobs=logprobs,
            index=choice.index if choice else 0,
            id=self.id,
            request_id=self.request_id,
        )

    def incomplete(self, reason: str) -> IncompleteStreamError:
        return IncompleteStreamError(
            f"stream cut off: {reason}", partial_text=self.text, request_id=self.request_id
        )

    def check_finished(self) -> None:
        if not self.done and self.finish_reason is None:
            raise self.incomplete("the body ended without [DONE] or a finish_reason")


class _StreamView:
    """Read-only view of what a stream has delivered so far (empty before it starts)."""

    _state: Optional[StreamState] = None

    @property
    def request_id(self) -> Optional[str]:
        return self._state.request_id if self._state else None

    @property
    def text(self) -> str:
        return self._state.text if self._state else ""

    @property
    def finish_reason(self) -> Optional[str]:
        return self._state.finish_reason if self._state else None

    @property
    def usage(self) -> Optional[Usage]:
        return self._state.usage if self._state else None


class ChatStream(_StreamView):
    """Iterator of StreamDelta. The request is sent on the first `next()`, so errors such as
    NotFoundError are raised there. Use as a context manager (or call close()) to release the
    connection when stopping early."""

    def __init__(self, open_response: Callable[[], httpx.Response]) -> None:
        self._open = open_response
        self._events = self._run()

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> StreamDelta:
        return next(self._events)

    def _run(self) -> Generator[StreamDelta, None, None]:
        response = self._open()
        state = self._state = StreamState(request_id_of(response))
        try:
            for data in iter_sse_data(response.iter_lines()):
                delta = state.feed(data)
                if state.done:
                    return
                if delta is not None:
                    yield delta
        except httpx.TransportError as exc:
            raise state.incomplete(connection_error(exc).message) from exc
        finally:
            response.close()
        state.check_finished()

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncChatStream(_StreamView):
    """Async iterator of StreamDelta; the async twin of ChatStream."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]]) -> None:
        self._open = open_response
        self._events = self._run()

    def __aiter__(self) -> "AsyncChatStream":
        return self

    async def __anext__(self) -> StreamDelta:
        return await self._events.__anext__()

    async def _run(self) -> AsyncGenerator[StreamDelta, None]:
        response = await self._open()
        state = self._state = StreamState(request_id_of(response))
        try:
            async for data in aiter_sse_data(response.aiter_lines()):
                delta = state.feed(data)
                if state.done:
                    return
                if delta is not None:
                    yield delta
        except httpx.TransportError as exc:
            raise state.incomplete(connection_error(exc).message) from exc
        finally:
            await response.aclose()
        state.check_finished()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
