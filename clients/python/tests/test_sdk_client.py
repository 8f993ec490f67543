"""Client configuration (arguments, environment) and the non-streaming calls."""
from __future__ import annotations

import json

import httpx
import pytest
import respx

from popserve_client import DEFAULT_BASE_URL, AsyncClient, ChatCompletion, Client, PopserveError

BASE_URL = "http://popserve.test"  # where the `server` fixture listens
CHAT = "/v1/chat/completions"
MODELS = {"object": "list", "data": [{"id": "tiny-vl", "object": "model", "owned_by": "popserve"}]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("POPSERVE_BASE_URL", raising=False)
    monkeypatch.delenv("POPSERVE_API_KEY", raising=False)


def sent(route) -> dict:
    return json.loads(route.calls.last.request.content)


# ---- configuration -------------------------------------------------------------------------
def test_defaults():
    with Client() as client:
        assert client.base_url == DEFAULT_BASE_URL == "http://127.0.0.1:8000"
        assert client.api_key is None
        assert "authorization" not in client.headers


def test_base_url_and_api_key_from_environment(monkeypatch, completion):
    monkeypatch.setenv("POPSERVE_BASE_URL", "http://env-host:9000")
    monkeypatch.setenv("POPSERVE_API_KEY", "sk-env")
    with respx.mock(base_url="http://env-host:9000") as mock:
        route = mock.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
        with Client() as client:
            client.chat(prompt="hi", model="m")
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-env"


def test_arguments_win_over_environment(monkeypatch, server, completion):
    monkeypatch.setenv("POPSERVE_BASE_URL", "http://env-host:9000")
    monkeypatch.setenv("POPSERVE_API_KEY", "sk-env")
    route = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
    with Client(BASE_URL, api_key="sk-arg") as client:
        client.chat(prompt="hi", model="m")
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-arg"
    assert str(route.calls.last.request.url) == BASE_URL + CHAT


def test_openai_style_base_url_with_v1_is_accepted(server, completion):
    route = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
    with Client(BASE_URL + "/v1/") as client:
        client.chat(prompt="hi", model="m")
    assert route.called


def test_timeouts_reach_httpx():
    with Client(connect_timeout=1.5, read_timeout=42.0) as client:
        timeout = client._http.client.timeout
    assert (timeout.connect, timeout.read) == (1.5, 42.0)


# ---- chat ----------------------------------------------------------------------------------
def test_chat_returns_a_typed_completion_with_request_id(server, completion):
    server.post(CHAT).mock(return_value=httpx.Response(200, json=completion(), headers={"x-request-id": "req-42"}))
    with Client(BASE_URL) as client:
        result = client.chat(messages=[{"role": "user", "content": "hi"}], model="tiny-vl")
    assert isinstance(result, ChatCompletion)
    assert result.text == "a red square" == result.choices[0].message.content
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 3 and result.usage.total_tokens == 14
    assert result.id == "chatcmpl-1"
    assert result.request_id == "req-42"


def test_chat_sends_only_what_was_set(server, completion):
    route = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    with Client(BASE_URL) as client:
        client.chat(messages, model="tiny-vl")
        assert sent(route) == {"model": "tiny-vl", "messages": messages}
        client.chat(
            prompt="hi", model="tiny-vl", max_tokens=7, temperature=0.0, top_p=0.9, seed=3,
            stop=["\n"], pop=False, extra={"top_k": 5}, presence_penalty=0.5, frequency_penalty=-0.5,
            logit_bias={1542: -100}, logprobs=True, top_logprobs=2,
        )
    assert sent(route) == {
        "model": "tiny-vl",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n"],
        "pop": False,
        "top_k": 5,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"1542": -100.0},
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert "stream" not in sent(route)


def test_model_defaults_to_the_first_listed(server, completion):
    models = server.get("/v1/models").mock(return_value=httpx.Response(200, json=MODELS))
    chat = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
    with Client(BASE_URL) as client:
        client.chat(prompt="a")
        client.chat(prompt="b")
    assert sent(chat)["model"] == "tiny-vl"
    assert models.call_count == 1  # looked up once


def test_client_default_model_is_used(server, completion):
    chat = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion()))
    with Client(BASE_URL, model="big-vl") as client:
        client.chat(prompt="a")
        assert sent(chat)["model"] == "big-vl"
        client.chat(prompt="a", model="other")
        assert sent(chat)["model"] == "other"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"messages": [{"role": "user", "content": "x"}], "prompt": "y"},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "x"}], "images": [b"\x89PNG\r\n\x1a\n"]},
    ],
)
def test_bad_arguments_raise_before_sending(server, kwargs):
    route = server.post(CHAT)
    with Client(BASE_URL) as client, pytest.raises(ValueError):
        client.chat(model="m", **kwargs)
    assert not route.called


def test_non_json_success_body_raises_a_clear_error(server):
    server.post(CHAT).mock(return_value=httpx.Response(200, text="<html>proxy</html>", headers={"x-request-id": "r"}))
    with Client(BASE_URL) as client, pytest.raises(PopserveError, match="expected JSON") as info:
        client.chat(prompt="hi", model="m")
    assert info.value.request_id == "r"


# ---- models and health ---------------------------------------------------------------------
def test_models(server):
    server.get("/v1/models").mock(return_value=httpx.Response(200, json=MODELS, headers={"x-request-id": "rm"}))
    with Client(BASE_URL) as client:
        models = client.models()
    assert models.ids == ["tiny-vl"]
    assert models.data[0].owned_by == "popserve"
    assert models.request_id == "rm"


def test_health_ok_and_not_ready(server):
    route = server.get("/health")
    route.mock(return_value=httpx.Response(200, json={"status": "ok"}, headers={"x-request-id": "h1"}))
    with Client(BASE_URL) as client:
        health = client.health()
        assert (health.ok, health.status_code, health.status, health.request_id) == (True, 200, "ok", "h1")
        route.mock(return_value=httpx.Response(503, json={"status": "starting", "stages": {"decode": False}}))
        health = client.health()
    assert (health.ok, health.status_code, health.status) == (False, 503, "starting")
    assert health.detail["stages"] == {"decode": False}


def test_health_with_an_empty_body(server):
    server.get("/health").mock(return_value=httpx.Response(200))
    with Client(BASE_URL) as client:
        assert client.health().ok is True


async def test_async_client_chat_models_health(server, completion):
    server.get("/v1/models").mock(return_value=httpx.Response(200, json=MODELS))
    server.get("/health").mock(return_value=httpx.Response(200, json={"status": "ok"}))
    chat = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion(), headers={"x-request-id": "a1"}))
    async with AsyncClient(BASE_URL, api_key="k") as client:
        result = await client.chat(prompt="hi", pop=False)
        assert (await client.models()).ids == ["tiny-vl"]
        assert (await client.health()).ok
    assert result.text == "a red square" and result.request_id == "a1"
    assert sent(chat)["model"] == "tiny-vl" and sent(chat)["pop"] is False
    assert chat.calls.last.request.headers["authorization"] == "Bearer k"
