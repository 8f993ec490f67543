"""When to retry, and how long to wait first. Pure decisions; the transports do the sleeping."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Optional

from .errors import APIConnectionError, APIStatusError, PopserveError

# Overload (429) and not-ready/overloaded (503) are worth another try; other statuses are the
# request's own fault or a server bug that a retry would only repeat.
RETRYABLE_STATUS = frozenset({429, 503})

# Indirections that tests replace with a fake clock.
_monotonic = time.monotonic
_random = random.random


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3  # retries after the first attempt
    initial_backoff: float = 0.5  # seconds before the first retry
    max_backoff: float = 8.0  # caps the client's own schedule, not a longer Retry-After
    multiplier: float = 2.0
    # A random fraction (up to this) of each wait, so clients that failed together do not all
    # come back at the same instant: removed from the client's own backoff, added on top of a
    # wait floored by Retry-After (never less than the server asked for).
    jitter: float = 0.25
    # Seconds from the first attempt: no retry is started if its wait (jitter included) would
    # end past this.
    total_budget: float = 30.0

    def backoff(self, retry_number: int, retry_after: Optional[float] = None) -> float:
        """The wait before retry number `retry_number` (1-based), jitter included.

        Without `retry_after`: b(n) = min(max_backoff, initial_backoff * multiplier**(n-1)),
        shortened by up to `jitter` of itself, so in [b(n) * (1 - jitter), b(n)].

        With the server's `retry_after` (seconds): it is a lower bound, not the whole answer. A
        server that always says `Retry-After: 1` would otherwise get every client back after
        exactly 1 s, every time, all together. The wait is max(retry_after, b(n)) lengthened by up
        to `jitter` of itself, so in [floor, floor * (1 + jitter)]: it still grows retry by
        retry, spreads clients out, and is never shorter than Retry-After.
        """
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))
        if retry_after is None:
            return delay * (1.0 - self.jitter * _random())
        return max(retry_after, delay) * (1.0 + self.jitter * _random())


NO_RETRY = RetryPolicy(max_retries=0)


def is_retryable(error: PopserveError) -> bool:
    if isinstance(error, APIStatusError):
        return error.status_code in RETRYABLE_STATUS
    if isinstance(error, APIConnectionError):
        return error.retryable
    return False


class RetryBudget:
    """Tracks one call's retries; ask it how long to wait after each failed attempt."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.retries = 0
        self.started = _monotonic()

    def next_delay(self, error: PopserveError) -> Optional[float]:
        """Seconds to wait before trying again, or None to give up and raise `error`."""
        if not is_retryable(error) or self.retries >= self.policy.max_retries:
            return None
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        # The server's Retry-After is a floor under our own backoff and jitter (see backoff()).
        delay = self.policy.backoff(self.retries + 1, retry_after)
        if _monotonic() - self.started + delay > self.policy.total_budget:
            return None
        self.retries += 1
        return delay
