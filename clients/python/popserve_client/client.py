"""Client and AsyncClient: chat, streaming chat, models and health of a popserve server."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

import httpx
from pydantic import BaseModel, ValidationError

from ._http import AsyncTransport, SyncTransport
from ._request import Message, chat_body
from ._retry import RetryPolicy
from ._stream import AsyncChatStream, ChatStream
from ._version import __version__
from .errors import PopserveError, ServiceUnavailableError, request_id_of
from .images import ImageSource
from .types import ChatCompletion, Health, ModelList

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"

_T = TypeVar("_T", bound=BaseModel)


class _BaseClient:
    """Settings shared by both clients: arguments first, then the environment, then defaults."""

    _transport_cls: Any  # SyncTransport or AsyncTransport

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        model: Optional[str] = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        max_retries: Optional[int] = None,
        retry: Optional[RetryPolicy] = None,
        image_max_side: Optional[int] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """
        base_url: server root (POPSERVE_BASE_URL, else http://127.0.0.1:8000); a trailing /v1,
            as OpenAI clients use, is accepted.
        api_key: sent as `Authorization: Bearer` (POPSERVE_API_KEY).
        model: default model for chat(); when neither this nor the call names one, the first
            model the server lists is used.
        read_timeout: seconds to wait for the next bytes; a non-streamed answer sends nothing
            until it is complete, so this bounds its generation time.
        max_retries / retry: how connection errors, 429 and 503 are retried (see RetryPolicy).
        image_max_side: default client-side downscale of local images (needs Pillow).
        """
        base_url = base_url or os.environ.get("POPSERVE_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = _strip_v1(base_url)
        self.api_key = api_key or os.environ.get("POPSERVE_API_KEY") or None
        self.model = model
        self.image_max_side = image_max_side
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        policy = retry or RetryPolicy()
        self.retry = policy if max_retries is None else dataclasses.replace(policy, max_retries=max_retries)
        self.headers = {"user-agent": f"popserve-client/{__version__}", "accept": "application/json"}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"
        self.headers.update(headers or {})
        self._listed_model: Optional[str] = None
        self._http = self._transport_cls(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, retry=self.retry
        )
    def _body(self, model: str, stream: bool, image_max_side: Optional[int], **params: Any) -> dict[str, Any]:
        max_side = image_max_side if image_max_side is not None else self.image_max_side
        return chat_body(model=model, stream=stream, image_max_side=max_side, **params)

    def _pick_model(self, models: ModelList) -> str:
        if not models.data:
            raise PopserveError("the server lists no models; pass model=...", request_id=models.request_id)
        self._listed_model = models.data[0].id
        return self._listed_model


class Client(_BaseClient):
    """Synchronous client. Use as a context manager, or call close()."""

    _transport_cls = SyncTransport
    _http: SyncTransport

    def chat(
        self,
        messages: Optional[Sequence[Message]] = None,
        *,
        prompt: Optional[str] = None,
        images: Optional[Sequence[ImageSource]] = None,
        model: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        pop: Optional[bool] = None,
        extra: Optional[Mapping[str, Any]] = None,
        image_max_side: Optional[int] = None,
    ) -> ChatCompletion:
        """One chat completion. Pass messages (OpenAI format) or a prompt with optional images.

        pop=False asks the server to turn its pruning off for this request; extra= adds any
        other body fields as they are.
        """
        body = self._body(
            self._model(model), False, image_max_side, messages=messages, prompt=prompt, images=images,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, pop=pop, extra=extra,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
            logprobs=logprobs, top_logprobs=top_logprobs,
        )
        return _parse(ChatCompletion, self._http.request("POST", CHAT_PATH, json=body))

    def chat_stream(
        self,
        messages: Optional[Sequence[Message]] = None,
        *,
        prompt: Optional[str] = None,
        images: Optional[Sequence[ImageSource]] = None,
        model: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        pop: Optional[bool] = None,
        extra: Optional[Mapping[str, Any]] = None,
        image_max_side: Optional[int] = None,
    ) -> ChatStream:
        """Like chat(), streamed: iterate the result for StreamDelta objects as tokens arrive.

        The request is sent when iteration starts. The last delta carries usage. A stream that
        stops early raises IncompleteStreamError; it is never retried once it has started.
        """
        # Built now so that bad arguments raise at the call; the model may need a request, so
        # like the chat request itself it waits until iteration starts.
        body = self._body(
            model or self.model or "", True, image_max_side, messages=messages, prompt=prompt, images=images,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, pop=pop, extra=extra,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
            logprobs=logprobs, top_logprobs=top_logprobs,
        )

        def open_response() -> httpx.Response:
            body["model"] = body["model"] or self._model(None)
            return self._http.request("POST", CHAT_PATH, json=body, stream=True)

        return ChatStream(open_response)

    def models(self) -> ModelList:
        """GET /v1/models."""
        return _parse(ModelList, self._http.request("GET", MODELS_PATH))

    def health(self) -> Health:
        """GET /health, once (a probe is not retried). ok=False when the server answers 503."""
        try:
            return _health(self._http.request("GET", HEALTH_PATH, retry=False))
        except ServiceUnavailableError as exc:
            return _unhealthy(exc)

    def _model(self, model: Optional[str]) -> str:
        return model or self.model or self._listed_model or self._pick_model(self.models())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """Asyncio client. Use with `async with`, or call aclose()."""

    _transport_cls = AsyncTransport
    _http: AsyncTransport

    async def chat(
        self,
        messages: Optional[Sequence[Message]] = None,
        *,
        prompt: Optional[str] = None,
        images: Optional[Sequence[ImageSource]] = None,
        model: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        pop: Optional[bool] = None,
        extra: Optional[Mapping[str, Any]] = None,
        image_max_side: Optional[int] = None,
    ) -> ChatCompletion:
        """See Client.chat."""
        body = self._body(
            await self._model(model), False, image_max_side, messages=messages, prompt=prompt, images=images,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, pop=pop, extra=extra,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
            logprobs=logprobs, top_logprobs=top_logprobs,
        )
        return _parse(ChatCompletion, await self._http.request("POST", CHAT_PATH, json=body))

    def chat_stream(
        self,
        messages: Optional[Sequence[Message]] = None,
        *,
        prompt: Optional[str] = None,
        images: Optional[Sequence[ImageSource]] = None,
        model: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        pop: Optional[bool] = None,
        extra: Optional[Mapping[str, Any]] = None,
        image_max_side: Optional[int] = None,
    ) -> AsyncChatStream:
        """See Client.chat_stream; use `async for delta in client.chat_stream(...)`."""
        body = self._body(  # as in Client.chat_stream
            model or self.model or "", True, image_max_side, messages=messages, prompt=prompt, images=images,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, pop=pop, extra=extra,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
            logprobs=logprobs, top_logprobs=top_logprobs,
        )

        async def open_response() -> httpx.Response:
            body["model"] = body["model"] or await self._model(None)
            return await self._http.request("POST", CHAT_PATH, json=body, stream=True)

        return AsyncChatStream(open_response)

    async def models(self) -> ModelList:
        """GET /v1/models."""
        return _parse(ModelList, await self._http.request("GET", MODELS_PATH))

    async def health(self) -> Health:
        """GET /health, once (a probe is not retried). ok=False when the server answers 503."""
        try:
            return _health(await self._http.request("GET", HEALTH_PATH, retry=False))
        except ServiceUnavailableError as exc:
            return _unhealthy(exc)

    async def _model(self, model: Optional[str]) -> str:
        return model or self.model or self._listed_model or self._pick_model(await self.models())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ---- helpers --------------------------------------------------------------------------------
def _strip_v1(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _parse(model_cls: type[_T], response: httpx.Response) -> _T:
    """A typed result from a JSON body, with the response's request id."""
    request_id = request_id_of(response)
    try:
        payload = response.json()
    except ValueError:
        raise PopserveError(
            f"expected JSON from {response.url}, got {response.text[:200]!r}", request_id=request_id
        ) from None
    if not isinstance(payload, dict):
        raise PopserveError(f"expected a JSON object from {response.url}", request_id=request_id)
    try:
        return model_cls.model_validate({**payload, "request_id": request_id or payload.get("request_id")})
    except ValidationError as exc:
        raise PopserveError(f"unexpected response from {response.url}: {exc}", request_id=request_id) from exc


def _health(response: httpx.Response) -> Health:
    body = _json_or_empty(response)
    return Health(ok=True, status_code=response.status_code, status=_status(body), detail=body,
                  request_id=request_id_of(response))


def _unhealthy(exc: ServiceUnavailableError) -> Health:
    body = exc.body if isinstance(exc.body, dict) else {}
    return Health(ok=False, status_code=exc.status_code, status=_status(body), detail=body, request_id=exc.request_id)


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _status(body: dict[str, Any]) -> Optional[str]:
    status = body.get("status")
    return status if isinstance(status, str) else None
