"""Typed exceptions, built from the server's OpenAI-format error bodies.

The server answers errors as {"error": {"message", "type", "param", "code"}} and tags every
response with an `x-request-id` header; both end up on the exception so a user can quote the
request id in a bug report.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Optional

import httpx

REQUEST_ID_HEADER = "x-request-id"


class PopserveError(Exception):
    """Base class of every error raised by popserve_client."""

    def __init__(self, message: str, *, request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request id {self.request_id})"
        return self.message


class APIConnectionError(PopserveError):
    """No HTTP response arrived: the connection failed or broke before the server answered."""

    def __init__(self, message: str, *, retryable: bool = True, request_id: Optional[str] = None) -> None:
        super().__init__(message, request_id=request_id)
        # Whether sending the request again may help (a refused connection may; a TLS error won't).
        self.retryable = retryable


class APITimeoutError(APIConnectionError):
    """The connect or read timeout ran out."""


class IncompleteStreamError(PopserveError):
    """A streamed answer stopped before the server said it was finished.

    Raised instead of returning a silently truncated answer; `partial_text` holds what arrived.
    """

    def __init__(self, message: str, *, partial_text: str = "", request_id: Optional[str] = None) -> None:
        super().__init__(message, request_id=request_id)
        self.partial_text = partial_text


class APIStatusError(PopserveError):
    """The server answered with an error status (or sent an error event inside a stream)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Any = None,
        request_id: Optional[str] = None,
        retry_after: Optional[float] = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, from the Retry-After header
        self.body = body  # the decoded error body, for anything the fields above miss

    def __str__(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in (("type", self.type), ("code", self.code)) if v)
        text = f"HTTP {self.status_code}: {self.message}"
        if details:
            text += f" [{details}]"
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


class BadRequestError(APIStatusError):
    """400: the request is malformed or asks for something the server refuses."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: for example an unknown model."""


class PayloadTooLargeError(APIStatusError):
    """413: the request (usually its images) is larger than the server accepts."""


class UnprocessableEntityError(APIStatusError):
    """422."""


class RateLimitError(APIStatusError):
    """429: too many requests; retried automatically within the retry budget."""


class InternalServerError(APIStatusError):
    """5xx."""


class ServiceUnavailableError(InternalServerError):
    """503: overloaded or not ready; retried automatically within the retry budget."""


_CLASS_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# In-stream errors arrive on an HTTP 200, so their kind comes from the OpenAI error type.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "service_unavailable": 503,
    "overloaded_error": 503,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code in _CLASS_BY_STATUS:
        return _CLASS_BY_STATUS[status_code]
    return InternalServerError if status_code >= 500 else APIStatusError


def request_id_of(response: httpx.Response) -> Optional[str]:
    return response.headers.get(REQUEST_ID_HEADER)


def retry_after_seconds(headers: httpx.Headers) -> Optional[float]:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _fields(body: Any) -> dict[str, Any]:
    """message/type/param/code from an OpenAI error body, tolerating other servers' shapes."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")  # "detail": FastAPI's own errors
            if message is not None and not isinstance(message, str):
                message = json.dumps(message)
            return {
                "message": message,
                "type": error.get("type"),
                "param": error.get("param"),
                "code": error.get("code"),
            }
        if isinstance(error, str):
            return {"message": error}
    return {}


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The typed exception for an error response. Its body must already have been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    fields = _fields(body)
    if not fields.get("message"):
        text = body if isinstance(body, str) else ""
        fields["message"] = text.strip()[:500] or response.reason_phrase or "request failed"
    cls = status_error_class(response.status_code)
    return cls(
        status_code=response.status_code,
        request_id=request_id_of(response),
        retry_after=retry_after_seconds(response.headers),
        body=body,
        **fields,
    )


def error_from_event(payload: dict[str, Any], request_id: Optional[str]) -> APIStatusError:
    """The typed exception for a `data: {"error": {...}}` event inside a stream."""
    fields = _fields(payload)
    fields["message"] = fields.get("message") or "the server reported an error mid-stream"
    status = _status_of_event(fields)
    return status_error_class(status)(status_code=status, request_id=request_id, body=payload, **fields)


def _status_of_event(fields: dict[str, Any]) -> int:
    code = fields.get("code")
    if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
        if 400 <= int(code) <= 599:
            return int(code)
    return _STATUS_BY_TYPE.get(fields.get("type") or "", 500)
