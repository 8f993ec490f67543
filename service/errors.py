"""Errors that cross the HTTP boundary, in OpenAI's shape: {"error": {message, type, param, code}}.

Stages raise ServeError subclasses; Ray wraps them on the way to the ingress, which unwraps them
(`from_exception`) so the client sees an honest status code, never a bare 500 for bad input.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")
logger = logging.getLogger("ray.serve")


class ServeError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after = message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # survive Ray's pickling with all fields
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after))


def _rebuild(cls, message, param, code, retry_after):
    return cls(message, param, code, retry_after)


class BadRequest(ServeError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ServeError):
    status, type = 401, "authentication_error"


class NotFound(ServeError):
    status, type = 404, "not_found_error"


class PayloadTooLarge(ServeError):
    status, type = 413, "invalid_request_error"


class Overloaded(ServeError):
    status, type = 503, "overloaded_error"

    def __init__(self, message: str = "server is at capacity, retry later", param=None, code="overloaded",
                 retry_after: Optional[float] = 1.0):
        super().__init__(message, param, code, retry_after)


# A stage replica that dies before the first token: the call is made again (every stage call is
# idempotent) up to this many times, after RETRY_BACKOFF_S x the attempt number, so that the
# router can drop the dead replica. The Ingress relaunches the request; Decode re-asks Prefill.
REPLICA_RETRIES = 2
RETRY_BACKOFF_S = 0.25


class StageFailed(ServeError):
    """A stage replica died or timed out mid-request."""

    status, type = 503, "server_error"


def from_exception(exc: BaseException) -> ServeError:
    """Find the ServeError inside Ray's wrappers; map Serve's own overload and failure errors."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    died = (rex.ActorDiedError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.OwnerDiedError,
            DeploymentUnavailableError)
    seen, failed = exc, None
    for _ in range(6):
        if isinstance(seen, ServeError):
            return seen
        if isinstance(seen, BackPressureError):
            return Overloaded(f"a stage queue is full: {seen}")
        if failed is None and isinstance(seen, died):  # also when wrapped (an upstream stage's replica died)
            failed = seen
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
    if failed is not None:
        return StageFailed(f"a stage replica failed during the request ({type(failed).__name__}); retry",
                           code="replica_failed", retry_after=1.0)
    if isinstance(exc, TimeoutError):
        return StageFailed("a stage did not answer in time", code="timeout", retry_after=1.0)
    return ServeError(f"internal error: {type(exc).__name__}: {exc}")


async def retry_replica_failures(attempt: Callable[[], Awaitable[T]], what: str,
                                 deadline: Optional[float] = None) -> T:
    """attempt(), made again when a stage replica died under it (REPLICA_RETRIES above), each
    time after a longer pause (never past `deadline`, a time.monotonic()): a replica killed a
    moment ago can still be in the router's list. Any other error is raised at once."""
    for n in range(1 + REPLICA_RETRIES):
        try:
            return await attempt()
        except Exception as exc:
            err = from_exception(exc)
            if n == REPLICA_RETRIES or err.code != "replica_failed":
                raise
            logger.warning("%s: %s; retry %d of %d", what, err.message, n + 1, REPLICA_RETRIES)
            pause = RETRY_BACKOFF_S * (n + 1)
            await asyncio.sleep(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
    raise AssertionError("unreachable")
