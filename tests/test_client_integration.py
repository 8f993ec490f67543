"""The Python client SDK (clients/python) against a real popserve server.

tests/conftest.py provides `popserve_url` (a running server on a tiny random-weight Qwen3-VL
checkpoint) and `popserve_model_name`. The weights are random, so the answers are arbitrary
text: these tests check structure and consistency (usage, finish reasons, streamed text equal to
the non-streamed greedy answer, request ids), not content.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "python"
try:
    import popserve_client  # noqa: F401
except ImportError:  # the client is a separate distribution: use it from the source tree
    sys.path.insert(0, str(CLIENT_DIR))

from popserve_client import AsyncClient, ChatCompletion, Client, NotFoundError, RetryPolicy  # noqa: E402

FINISH_REASONS = {"stop", "length"}
QUESTION = "What is in this picture?"
# A loaded CPU box may answer 503 for a moment; the client's retries absorb that.
PATIENT = RetryPolicy(max_retries=6, initial_backoff=0.5, max_backoff=8.0, total_budget=120.0)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A small PNG with some structure (a gradient and a square), made here."""
    img = Image.new("RGB", (64, 64))
    img.putdata([(4 * x, 4 * y, 128) for y in range(64) for x in range(64)])
    img.paste((250, 250, 0), (16, 16, 40, 40))
    path = tmp_path_factory.mktemp("client") / "gradient.png"
    img.save(path)
    return path


@pytest.fixture
def client(popserve_url):
    with Client(popserve_url, retry=PATIENT, read_timeout=300) as c:
        yield c


def check_completion(result: ChatCompletion, max_tokens: int) -> None:
    assert result.request_id, "every response carries x-request-id"
    assert result.id
    assert len(result.choices) == 1
    assert result.finish_reason in FINISH_REASONS
    assert result.text, "a non-empty answer"
    usage = result.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if result.finish_reason == "length":
        assert usage.completion_tokens == max_tokens


def test_health_and_models(client, popserve_model_name):
    health = client.health()
    assert health.ok and health.status_code == 200
    assert health.request_id
    models = client.models()
    assert popserve_model_name in models.ids
    assert models.request_id


def test_image_chat(client, popserve_model_name, image_path):
    ask = dict(prompt=QUESTION, model=popserve_model_name, max_tokens=8, temperature=0.0)
    text_only = client.chat(**ask)
    with_image = client.chat(**ask, images=[image_path])
    check_completion(text_only, 8)
    check_completion(with_image, 8)
    # The image reached the model: its tokens are part of the prompt.
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens
    assert with_image.request_id != text_only.request_id

    # The same pixels sent as bytes or as a PIL image give the same greedy answer.
    assert client.chat(**ask, images=[image_path.read_bytes()]).text == with_image.text
    with Image.open(image_path) as img:
        assert client.chat(**ask, images=[img]).text == with_image.text


def test_messages_format_and_pop_off(client, popserve_model_name, image_path):
    from popserve_client import image_part

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(image_path), {"type": "text", "text": QUESTION}]},
    ]
    for pop in (None, False):
        result = client.chat(messages, model=popserve_model_name, max_tokens=6, temperature=0.0, pop=pop)
        check_completion(result, 6)


def test_streaming_equals_the_greedy_answer(client, popserve_model_name, image_path):
    ask = dict(prompt=QUESTION, images=[image_path], model=popserve_model_name, max_tokens=12, temperature=0.0, seed=0)
    full = client.chat(**ask)
    check_completion(full, 12)

    with client.chat_stream(**ask) as stream:
        deltas = list(stream)
    assert "".join(d.text for d in deltas) == full.text == stream.text
    assert [d.finish_reason for d in deltas if d.finish_reason] == [full.finish_reason]
    final = deltas[-1].usage
    assert final is not None, "usage arrives on the final chunk"
    assert all(d.usage is None for d in deltas[:-1])
    assert final.completion_tokens == full.usage.completion_tokens
    assert final.prompt_tokens == full.usage.prompt_tokens
    # Asked again, the prompt's whole 32-token blocks come from the server's prefix cache.
    assert final.prompt_tokens_details.cached_tokens == (final.prompt_tokens - 1) // 32 * 32
    assert stream.request_id and stream.request_id != full.request_id
    assert all(d.request_id == stream.request_id for d in deltas)


def test_logprobs_arrive_typed_whole_and_streamed(client, popserve_model_name, image_path):
    """Logprobs come back as typed objects: one entry per generated token with its top alternatives,
    the same entries streamed (spread over the deltas) as whole."""
    ask = dict(prompt=QUESTION, images=[image_path], model=popserve_model_name, max_tokens=8, temperature=0.0,
               logprobs=True, top_logprobs=3, frequency_penalty=0.5)
    full = client.chat(**ask)
    entries = full.choices[0].logprobs.content
    assert len(entries) == full.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 and e.bytes is not None for e in entries)
    with client.chat_stream(**ask) as stream:
        streamed = [e for d in stream for e in d.logprobs]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert client.chat(**{**ask, "logprobs": None, "top_logprobs": None}).choices[0].logprobs is None
    forced = client.chat(**{**ask, "max_tokens": 4, "logit_bias": {150: 100}}).choices[0].logprobs.content
    assert len(forced) == 4 and len({bytes(e.bytes) for e in forced}) == 1  # one token, four times


async def test_twenty_concurrent_async_requests(popserve_url, popserve_model_name, image_path):
    async def one(client: AsyncClient, i: int):
        max_tokens = 3 + i % 5
        ask = dict(
            prompt=f"Request {i}: {QUESTION}",
            images=[image_path] if i % 2 else None,
            model=popserve_model_name,
            max_tokens=max_tokens,
            temperature=0.0,
        )
        if i % 4 == 3:  # a quarter of them stream
            stream = client.chat_stream(**ask)
            deltas = [d async for d in stream]
            assert stream.finish_reason in FINISH_REASONS
            assert stream.text
            assert deltas[-1].usage is not None
            assert 1 <= deltas[-1].usage.completion_tokens <= max_tokens
            return stream.request_id
        result = await client.chat(**ask)
        check_completion(result, max_tokens)
        return result.request_id

    async with AsyncClient(popserve_url, retry=PATIENT, read_timeout=300) as client:
        request_ids = await asyncio.gather(*(one(client, i) for i in range(20)))
    assert all(request_ids)
    assert len(set(request_ids)) == 20


def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFoundError) as info:
        client.chat(prompt="hello", model="no-such-model", max_tokens=4)
    error = info.value
    assert error.status_code == 404
    assert error.message
    assert isinstance(error.type, str)
    assert error.request_id

    with pytest.raises(NotFoundError):
        next(iter(client.chat_stream(prompt="hello", model="no-such-model", max_tokens=4)))


def cli(*args: str) -> tuple[int, str, str]:
    """popserve-chat as a user runs it: the installed console script, else `python -m`.

    Returns (exit code, stdout, stderr). Output is decoded by hand: text mode would turn a
    "\r" in the (random) answer into "\n".
    """
    script = Path(sys.executable).parent / "popserve-chat"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "popserve_client"]
    pythonpath = os.pathsep.join(filter(None, [str(CLIENT_DIR), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONIOENCODING="utf-8")
    done = subprocess.run(command + list(args), capture_output=True, timeout=300, env=env)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def test_cli(client, popserve_url, popserve_model_name, image_path):
    ask = ["--image", str(image_path), "--base-url", popserve_url, "--model", popserve_model_name,
           "--max-tokens", "8", "--temperature", "0"]
    expected = client.chat(prompt=QUESTION, images=[image_path], model=popserve_model_name,
                           max_tokens=8, temperature=0.0).text

    code, out, err = cli(QUESTION, *ask)
    assert code == 0, err
    assert out == expected + "\n"

    code, out, err = cli(QUESTION, *ask, "--stream")
    assert code == 0, err
    assert out == expected + "\n"

    code, out, err = cli(QUESTION, "--base-url", popserve_url, "--model", "no-such-model")
    assert code != 0
    assert "404" in err
    assert out == ""
