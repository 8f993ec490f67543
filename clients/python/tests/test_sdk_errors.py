"""Error responses become typed exceptions carrying the OpenAI error fields and the request id."""
from __future__ import annotations

import httpx
import pytest

from popserve_client import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PopserveError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from popserve_client.errors import error_from_event

BASE_URL = "http://popserve.test"  # where the `server` fixture listens
CHAT = "/v1/chat/completions"


def openai_error(status: int, **fields) -> httpx.Response:
    error = {"message": "went wrong", "type": "invalid_request_error", "param": None, "code": None, **fields}
    return httpx.Response(status, json={"error": error}, headers={"x-request-id": f"req-{status}"})


@pytest.fixture
def client(policy):
    with Client(BASE_URL, retry=policy, max_retries=0) as c:
        yield c


@pytest.mark.parametrize(
    "status, error",
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, ServiceUnavailableError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_exception_type(server, client, status, error):
    server.post(CHAT).mock(return_value=openai_error(status))
    with pytest.raises(error) as info:
        client.chat(prompt="hi", model="m")
    assert type(info.value) is error
    assert info.value.status_code == status
    assert info.value.request_id == f"req-{status}"


def test_exception_carries_the_openai_fields(server, client):
    server.post(CHAT).mock(
        return_value=openai_error(404, message="The model `nope` does not exist", param="model", code="model_not_found")
    )
    with pytest.raises(NotFoundError) as info:
        client.chat(prompt="hi", model="nope")
    exc = info.value
    assert exc.message == "The model `nope` does not exist"
    assert exc.type == "invalid_request_error"
    assert exc.param == "model"
    assert exc.code == "model_not_found"
    assert exc.body["error"]["code"] == "model_not_found"
    text = str(exc)
    assert "HTTP 404" in text and "does not exist" in text and "req-404" in text and "model_not_found" in text


def test_hierarchy_lets_callers_catch_broadly():
    assert issubclass(ServiceUnavailableError, InternalServerError)
    assert issubclass(InternalServerError, APIStatusError)
    assert issubclass(NotFoundError, APIStatusError)
    assert issubclass(APIStatusError, PopserveError)


def test_non_json_error_body_uses_the_text(server, client):
    server.post(CHAT).mock(return_value=httpx.Response(502, text="upstream exploded\n", headers={"x-request-id": "r1"}))
    with pytest.raises(InternalServerError) as info:
        client.chat(prompt="hi", model="m")
    assert info.value.message == "upstream exploded"
    assert info.value.type is None
    assert info.value.request_id == "r1"


def test_fastapi_detail_body_is_understood(server, client):
    server.post(CHAT).mock(return_value=httpx.Response(400, json={"detail": "messages must not be empty"}))
    with pytest.raises(BadRequestError) as info:
        client.chat(prompt="hi", model="m")
    assert info.value.message == "messages must not be empty"
    assert info.value.request_id is None


def test_empty_error_body_falls_back_to_the_reason_phrase(server, client):
    server.post(CHAT).mock(return_value=httpx.Response(413))
    with pytest.raises(PayloadTooLargeError) as info:
        client.chat(prompt="hi", model="m")
    assert info.value.message == "Request Entity Too Large"


def test_models_and_health_errors_are_typed_too(server, client):
    server.get("/v1/models").mock(return_value=openai_error(401, type="authentication_error"))
    server.get("/health").mock(return_value=openai_error(500, type="server_error"))
    with pytest.raises(AuthenticationError):
        client.models()
    with pytest.raises(InternalServerError):
        client.health()


@pytest.mark.parametrize(
    "error, expected_type, status",
    [
        ({"message": "busy", "type": "service_unavailable"}, ServiceUnavailableError, 503),
        ({"message": "slow down", "type": "rate_limit_error"}, RateLimitError, 429),
        ({"message": "bad", "type": "invalid_request_error"}, BadRequestError, 400),
        ({"message": "boom", "type": "server_error", "code": 503}, ServiceUnavailableError, 503),
        ({"message": "boom", "type": "server_error", "code": "413"}, PayloadTooLargeError, 413),
        ({"message": "replica died"}, InternalServerError, 500),
    ],
)
def test_in_stream_error_events_map_by_code_then_type(error, expected_type, status):
    exc = error_from_event({"error": error}, "req-s")
    assert type(exc) is expected_type
    assert exc.status_code == status
    assert exc.message == error["message"]
    assert exc.request_id == "req-s"
