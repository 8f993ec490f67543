"""Retries: what is retried, how long the client waits, and the total budget."""
from __future__ import annotations

import dataclasses

import httpx
import pytest

from popserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    _retry,
)

BASE_URL = "http://popserve.test"  # where the `server` fixture listens
CHAT = "/v1/chat/completions"


def overloaded(status: int = 503, retry_after: str | None = None) -> httpx.Response:
    headers = {"x-request-id": "req-busy"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    body = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
    return httpx.Response(status, json=body, headers=headers)


def ask(client: Client):
    return client.chat(prompt="hi", model="tiny-vl")


def test_503_then_success_retries_with_exponential_backoff(server, clock, policy, completion):
    ok = httpx.Response(200, json=completion())
    route = server.post(CHAT).mock(side_effect=[overloaded(), overloaded(), ok])
    with Client(BASE_URL, retry=policy) as client:
        result = ask(client)
    assert result.text == "a red square"
    assert route.call_count == 3
    assert clock.sleeps == [0.5, 1.0]


def test_gives_up_after_max_retries(server, clock, policy):
    route = server.post(CHAT).mock(return_value=overloaded())
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError) as info:
        ask(client)
    assert route.call_count == 1 + policy.max_retries
    assert clock.sleeps == [0.5, 1.0, 2.0]
    assert info.value.request_id == "req-busy"


def test_backoff_is_capped_by_max_backoff(server, clock):
    policy = RetryPolicy(max_retries=5, initial_backoff=1.0, max_backoff=3.0, jitter=0.0, total_budget=100.0)
    server.post(CHAT).mock(return_value=overloaded())
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    assert clock.sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_total_budget_stops_retrying_before_it_is_exceeded(server, clock):
    # Waits would be 1, 2, 4, 8 ...; a 5 s budget allows 1 + 2 (3 s) but not + 4 (7 s).
    policy = RetryPolicy(max_retries=10, initial_backoff=1.0, jitter=0.0, max_backoff=60.0, total_budget=5.0)
    route = server.post(CHAT).mock(return_value=overloaded())
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    assert clock.sleeps == [1.0, 2.0]
    assert route.call_count == 3
    assert sum(clock.sleeps) <= policy.total_budget


def test_budget_counts_time_spent_in_attempts_too(server, clock):
    policy = RetryPolicy(max_retries=10, initial_backoff=1.0, multiplier=1.0, jitter=0.0, total_budget=10.0)

    def slow_503(request):
        clock.now += 4.0  # each attempt takes 4 s on the server
        return overloaded()

    route = server.post(CHAT).mock(side_effect=slow_503)
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    # t=4 fail, wait 1 -> t=9 fail; another wait would end at 10 (ok), t=14 fail; 14+1 > 10: stop.
    assert route.call_count == 3
    assert clock.sleeps == [1.0, 1.0]


def test_jitter_removes_a_random_fraction_of_each_wait(server, clock, monkeypatch, completion):
    draws = iter([1.0, 0.5, 0.0])
    monkeypatch.setattr(_retry, "_random", lambda: next(draws))
    policy = RetryPolicy(max_retries=3, initial_backoff=1.0, jitter=0.5, total_budget=60.0)
    ok = httpx.Response(200, json=completion())
    server.post(CHAT).mock(side_effect=[overloaded(), overloaded(), overloaded(), ok])
    with Client(BASE_URL, retry=policy) as client:
        ask(client)
    assert clock.sleeps == [1.0 * 0.5, 2.0 * 0.75, 4.0 * 1.0]


def test_jittered_waits_stay_within_bounds():
    policy = RetryPolicy(initial_backoff=2.0, jitter=0.25)
    waits = [policy.backoff(1) for _ in range(200)]
    assert all(1.5 <= w <= 2.0 for w in waits)
    assert len(set(waits)) > 1  # really random


def test_retry_after_seconds_is_honoured(server, clock, policy, completion):
    route = server.post(CHAT).mock(side_effect=[overloaded(429, "7"), httpx.Response(200, json=completion())])
    with Client(BASE_URL, retry=policy) as client:
        ask(client)
    assert clock.sleeps == [7.0]
    assert route.call_count == 2


def test_retry_after_on_503_is_honoured(server, clock, policy, completion):
    server.post(CHAT).mock(side_effect=[overloaded(503, "2.5"), httpx.Response(200, json=completion())])
    with Client(BASE_URL, retry=policy) as client:
        ask(client)
    assert clock.sleeps == [2.5]


def test_retry_after_beyond_the_budget_raises_at_once(server, clock, policy):
    route = server.post(CHAT).mock(return_value=overloaded(429, "120"))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(RateLimitError) as info:
        ask(client)
    assert route.call_count == 1
    assert clock.sleeps == []
    assert info.value.retry_after == 120.0
    assert info.value.status_code == 429


@pytest.mark.parametrize(
    "status, error",
    [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (500, InternalServerError)],
)
def test_other_errors_are_not_retried(server, clock, policy, status, error):
    route = server.post(CHAT).mock(return_value=httpx.Response(status, json={"error": {"message": "no"}}))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(error):
        ask(client)
    assert route.call_count == 1
    assert clock.sleeps == []


def test_connection_errors_are_retried(server, clock, policy, completion):
    ok = httpx.Response(200, json=completion())
    route = server.post(CHAT).mock(side_effect=[httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset"), ok])
    with Client(BASE_URL, retry=policy) as client:
        assert ask(client).text == "a red square"
    assert route.call_count == 3
    assert clock.sleeps == [0.5, 1.0]


def test_connection_errors_raise_after_the_last_retry(server, clock, policy):
    route = server.post(CHAT).mock(side_effect=httpx.ConnectError("refused"))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(APIConnectionError) as info:
        ask(client)
    assert route.call_count == 4
    assert "refused" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_connect_timeout_is_retried(server, clock, policy, completion):
    route = server.post(CHAT).mock(side_effect=[httpx.ConnectTimeout("slow"), httpx.Response(200, json=completion())])
    with Client(BASE_URL, retry=policy) as client:
        ask(client)
    assert route.call_count == 2


def test_read_timeout_is_not_retried(server, clock, policy):
    # The server may still be generating: a resend would only double its work.
    route = server.post(CHAT).mock(side_effect=httpx.ReadTimeout("generation too slow"))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(APITimeoutError):
        ask(client)
    assert route.call_count == 1


def test_max_retries_zero_disables_retries(server, clock, policy):
    route = server.post(CHAT).mock(return_value=overloaded())
    with Client(BASE_URL, retry=policy, max_retries=0) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    assert route.call_count == 1


def test_health_is_probed_once_without_retries(server, clock, policy):
    route = server.get("/health").mock(return_value=overloaded())
    with Client(BASE_URL, retry=policy) as client:
        assert client.health().ok is False
    assert route.call_count == 1


async def test_async_client_retries_the_same_way(server, clock, policy, completion):
    route = server.post(CHAT).mock(
        side_effect=[httpx.ConnectError("refused"), overloaded(429, "3"), httpx.Response(200, json=completion())]
    )
    async with AsyncClient(BASE_URL, retry=policy) as client:
        result = await client.chat(prompt="hi", model="tiny-vl")
    assert result.text == "a red square"
    assert route.call_count == 3
    assert clock.sleeps == [0.5, 3.0]


async def test_async_client_respects_the_budget(server, clock):
    policy = dataclasses.replace(RetryPolicy(), max_retries=10, initial_backoff=1.0, jitter=0.0, total_budget=5.0)
    route = server.post(CHAT).mock(return_value=overloaded())
    async with AsyncClient(BASE_URL, retry=policy) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.chat(prompt="hi", model="tiny-vl")
    assert route.call_count == 3
    assert clock.sleeps == [1.0, 2.0]


# Retry-After is a floor under the client's own backoff and jitter, not the whole wait: a server
# that always answers overload with `Retry-After: 1` must not get every client back after exactly
# 1 s, every time, all at once.


def test_retry_after_is_a_floor_under_growing_backoff(server, clock, policy, completion):
    policy = dataclasses.replace(policy, max_retries=4)  # no jitter: backoff 0.5, 1, 2, 4
    ok = httpx.Response(200, json=completion())
    route = server.post(CHAT).mock(side_effect=[overloaded(503, "1")] * 4 + [ok])
    with Client(BASE_URL, retry=policy) as client:
        assert ask(client).text == "a red square"
    assert route.call_count == 5
    assert clock.sleeps == [1.0, 1.0, 2.0, 4.0]  # max(1, backoff): it grows past Retry-After


def test_jitter_is_added_on_top_of_retry_after_never_below_it(server, clock, monkeypatch):
    draws = iter([0.0, 1.0, 0.5])
    monkeypatch.setattr(_retry, "_random", lambda: next(draws))
    policy = RetryPolicy(max_retries=3, initial_backoff=0.5, multiplier=2.0, jitter=0.5, total_budget=60.0)
    route = server.post(CHAT).mock(return_value=overloaded(429, "1"))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(RateLimitError):
        ask(client)
    assert route.call_count == 4
    # floors max(1, 0.5), max(1, 1), max(1, 2), each lengthened by jitter * draw
    assert clock.sleeps == [1.0 * 1.0, 1.0 * 1.5, 2.0 * 1.25]
    assert all(wait >= 1.0 for wait in clock.sleeps)


def test_jittered_waits_with_retry_after_stay_within_bounds():
    policy = RetryPolicy(initial_backoff=0.5, jitter=0.25)
    waits = [policy.backoff(1, retry_after=1.0) for _ in range(200)]
    assert all(1.0 <= w <= 1.25 for w in waits)
    assert len(set(waits)) > 1  # really random: the server's floor is not the whole answer


def test_clients_turned_away_together_come_back_at_different_times(server, clock, monkeypatch, completion):
    policy = RetryPolicy(max_retries=3, initial_backoff=0.5, jitter=0.25, total_budget=60.0)
    ok = httpx.Response(200, json=completion())
    server.post(CHAT).mock(side_effect=[overloaded(503, "1"), ok, overloaded(503, "1"), ok])
    waits = []
    for draw in (0.2, 0.8):  # two clients, two different random draws
        monkeypatch.setattr(_retry, "_random", lambda draw=draw: draw)
        clock.sleeps.clear()
        with Client(BASE_URL, retry=policy) as client:
            ask(client)
        waits.append(clock.sleeps[0])
    assert waits == [pytest.approx(1.05), pytest.approx(1.2)]
    assert waits[0] != waits[1]
    assert min(waits) >= 1.0


async def test_async_client_uses_retry_after_as_a_floor_too(server, clock, policy):
    route = server.post(CHAT).mock(return_value=overloaded(503, "1"))
    async with AsyncClient(BASE_URL, retry=policy) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.chat(prompt="hi", model="tiny-vl")
    assert route.call_count == 4
    assert clock.sleeps == [1.0, 1.0, 2.0]


def test_budget_still_stops_retries_when_retry_after_is_a_floor(server, clock):
    # Waits max(1, 0.5 * 2**k): 1, 1, 2 (4 s in all); the next, 4, would end at 8 > 5: give up.
    policy = RetryPolicy(max_retries=10, initial_backoff=0.5, jitter=0.0, max_backoff=60.0, total_budget=5.0)
    route = server.post(CHAT).mock(return_value=overloaded(503, "1"))
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    assert clock.sleeps == [1.0, 1.0, 2.0]
    assert route.call_count == 4
    assert sum(clock.sleeps) <= policy.total_budget


def test_budget_counts_the_jitter_added_to_retry_after(server, clock, monkeypatch, completion):
    # Retry-After 2 fits a 2.2 s budget; lengthened by 25% (2.5 s) it would end past it.
    policy = RetryPolicy(max_retries=3, initial_backoff=0.5, jitter=0.25, total_budget=2.2)
    busy, ok = overloaded(503, "2"), httpx.Response(200, json=completion())
    route = server.post(CHAT).mock(side_effect=[busy, busy, ok])  # two clients, one after the other
    monkeypatch.setattr(_retry, "_random", lambda: 1.0)  # the longest jitter: over the budget
    with Client(BASE_URL, retry=policy) as client, pytest.raises(ServiceUnavailableError):
        ask(client)
    assert route.call_count == 1
    assert clock.sleeps == []
    monkeypatch.setattr(_retry, "_random", lambda: 0.0)  # no jitter: Retry-After alone fits
    with Client(BASE_URL, retry=policy) as client:
        assert ask(client).text == "a red square"
    assert route.call_count == 3
    assert clock.sleeps == [2.0]
