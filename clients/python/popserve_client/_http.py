"""HTTP transport: one httpx client, typed errors, and retries around getting a response.

Retries cover only the time until a successful response's headers arrive. Once a stream has
started the transport is out of the picture, so a caller never receives tokens twice.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import httpx

from ._retry import NO_RETRY, RetryBudget, RetryPolicy
from .errors import (
    APIConnectionError,
    APITimeoutError,
    PopserveError,
    error_from_response,
)

log = logging.getLogger("popserve_client")

# Indirections that tests replace with a fake clock.
_sleep = time.sleep
_async_sleep = asyncio.sleep

# Failures that happen before the server could have acted on the request, or where the
# connection (not the request) broke: worth sending again. Read/write/pool timeouts are not:
# the server may still be busy generating, and a resend would only add load.
_RETRYABLE_TRANSPORT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    retryable = isinstance(exc, _RETRYABLE_TRANSPORT)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(exc).__name__}): {detail}", retryable=retryable)
    return APIConnectionError(f"connection failed: {detail}", retryable=retryable)


class SyncTransport:
    def __init__(self, *, base_url: str, headers: dict[str, str], timeout: httpx.Timeout, retry: RetryPolicy) -> None:
        self.retry = retry
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def request(
        self, method: str, path: str, *, json: Any = None, stream: bool = False, retry: bool = True
    ) -> httpx.Response:
        """A successful response (streaming: still open, the caller closes it), else a typed error."""
        budget = RetryBudget(self.retry if retry else NO_RETRY)
        while True:
            request = self.client.build_request(method, path, json=json)
            error: PopserveError
            cause: Optional[BaseException] = None
            try:
                response = self.client.send(request, stream=stream)
                if response.is_success:
                    return response
                try:
                    response.read()  # the error body, even when the request was for a stream
                finally:
                    response.close()
                error = error_from_response(response)
            except httpx.TransportError as exc:
                error, cause = connection_error(exc), exc
            delay = budget.next_delay(error)
            if delay is None:
                raise error from cause
            log.info("popserve: %s; retry %d in %.2fs", error, budget.retries, delay)
            _sleep(delay)

    def close(self) -> None:
        self.client.close()


class AsyncTransport:
    def __init__(self, *, base_url: str, headers: dict[str, str], timeout: httpx.Timeout, retry: RetryPolicy) -> None:
        self.retry = retry
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)

    async def request(
        self, method: str, path: str, *, json: Any = None, stream: bool = False, retry: bool = True
    ) -> httpx.Response:
        """The async twin of SyncTransport.request."""
        budget = RetryBudget(self.retry if retry else NO_RETRY)
        while True:
            request = self.client.build_request(method, path, json=json)
            error: PopserveError
            cause: Optional[BaseException] = None
            try:
                response = await self.client.send(request, stream=stream)
                if response.is_success:
                    return response
                try:
                    await response.aread()  # the error body, even when the request was for a stream
                finally:
                    await response.aclose()
                error = error_from_response(response)
            except httpx.TransportError as exc:
                error, cause = connection_error(exc), exc
            delay = budget.next_delay(error)
            if delay is None:
                raise error from cause
            log.info("popserve: %s; retry %d in %.2fs", error, budget.retries, delay)
            await _async_sleep(delay)

    async def aclose(self) -> None:
        await self.client.aclose()
