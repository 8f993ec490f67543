"""popserve-chat: prints answers, streams tokens, and fails with a message and a non-zero code."""
from __future__ import annotations

import json

import httpx
import pytest

from popserve_client import cli

BASE_URL = "http://popserve.test"  # where the `server` fixture listens
CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def no_waiting(clock):
    """The CLI uses the default retry policy; the fake clock makes its waits instant."""


def run(*argv: str) -> int:
    return cli.main(["--base-url", BASE_URL, *argv])


def test_prints_the_answer(server, capsys, tmp_path, make_png, completion):
    image = tmp_path / "cat.png"
    image.write_bytes(make_png())
    route = server.post(CHAT).mock(return_value=httpx.Response(200, json=completion("a cat")))
    code = run("What is it?", "--image", str(image), "--model", "tiny-vl", "--max-tokens", "9", "--no-pop")
    out = capsys.readouterr()
    assert code == 0
    assert out.out == "a cat\n"
    body = json.loads(route.calls.last.request.content)
    assert body["model"] == "tiny-vl" and body["max_tokens"] == 9 and body["pop"] is False
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_streams_tokens(server, capsys, sse, stream_of):
    events = sse(*stream_of("one", " two"))
    route = server.post(CHAT).mock(
        return_value=httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})
    )
    assert run("count", "--stream", "--model", "m", "--api-key", "sk-1") == 0
    assert capsys.readouterr().out == "one two\n"
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-1"


def test_api_error_exits_non_zero_with_the_message(server, capsys):
    error = {"message": "The model `nope` does not exist", "type": "invalid_request_error", "code": "model_not_found"}
    body = {"error": error}
    server.post(CHAT).mock(return_value=httpx.Response(404, json=body, headers={"x-request-id": "r-9"}))
    code = run("hi", "--model", "nope")
    err = capsys.readouterr().err
    assert code == 1
    assert "does not exist" in err and "404" in err and "r-9" in err


def test_cut_stream_exits_non_zero_after_the_partial_answer(server, capsys, sse, chunk):
    server.post(CHAT).mock(return_value=httpx.Response(200, content=sse(chunk(content="par"), done=False)))
    assert run("hi", "--stream", "--model", "m") == 1
    out = capsys.readouterr()
    assert out.out == "par\n"
    assert "stream cut off" in out.err


def test_missing_image_file_is_an_error_not_a_traceback(server, capsys, tmp_path):
    assert run("hi", "--image", str(tmp_path / "missing.png"), "--model", "m") == 1
    assert "missing.png" in capsys.readouterr().err


def test_unreachable_server(capsys, clock):
    assert cli.main(["hi", "--base-url", "http://127.0.0.1:9", "--model", "m"]) == 1
    assert "connection failed" in capsys.readouterr().err
    assert len(clock.sleeps) == 3  # retried with backoff before giving up
