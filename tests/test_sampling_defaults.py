"""The checkpoint's generation_config.json gives the sampling defaults (vLLM's `--generation-config
auto`): what a request leaves unset (or sets to null) comes from the model, what it sets wins, and
`sampling_defaults: openai` ignores the model. Real Qwen3-VL asks for top_k 20, top_p 0.8,
temperature 0.7; here a copy of the tiny checkpoint asks for top_k 1, which makes any sampling
greedy, so that the server's answers show whether the default reached decode."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from popserve.models.prompt import PromptBuilder
from popserve.service.ingress import sampling_defaults
from popserve.service.protocol import ChatCompletionRequest
from popserve_testing import deploy
from popserve_testing import server_config as make_config
from test_reliability import App

APP = "model-defaults"
QUESTION = "Tell me a story about the sea and a boy who lived near it."


def with_generation_config(src, dst, **values):
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True, **values}))
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_dir):
    return with_generation_config(qwen_dir, tmp_path_factory.mktemp("defaults") / "qwen", top_k=1, temperature=0.9)


def test_the_model_sets_what_a_request_leaves_unset(model_dir, qwen_dir, tmp_path):
    builder = PromptBuilder(model_dir)
    assert builder.sampling_defaults == {"top_k": 1, "temperature": 0.9}
    assert PromptBuilder(qwen_dir).sampling_defaults == {}  # transformers' own defaults are not the model's
    assert sampling_defaults(builder, "openai") == {}
    model = sampling_defaults(builder, "model")

    def sampling(**body):
        return ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}).sampling(model)

    openai = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    assert sampling() == {**openai, "top_k": 1, "temperature": 0.9}
    assert sampling(top_k=None, temperature=0.2) == {**openai, "top_k": 1, "temperature": 0.2}  # null is unset
    assert sampling(top_k=0, top_p=0.5, min_p=0.1) == {**openai, "temperature": 0.9, "top_p": 0.5, "min_p": 0.1}

    # Values a file sets are the model's even where they equal transformers' old defaults.
    assert PromptBuilder(with_generation_config(qwen_dir, tmp_path / "plain", temperature=1.0, top_k=50,
                                                repetition_penalty=1.0)).sampling_defaults == \
        {"temperature": 1.0, "top_k": 50, "repetition_penalty": 1.0}
    # Without generation_config.json, what config.json says (transformers' and vLLM's fallback):
    # its end-of-turn ids, and no sampling values (transformers 5 keeps none from config.json).
    bare = tmp_path / "bare"
    shutil.copytree(qwen_dir, bare)
    (bare / "generation_config.json").unlink()
    assert PromptBuilder(bare).sampling_defaults == {}
    assert PromptBuilder(bare).eos_token_ids == PromptBuilder(qwen_dir).eos_token_ids

    bad = PromptBuilder(with_generation_config(qwen_dir, tmp_path / "bad", repetition_penalty=3.0))
    with pytest.raises(ValueError, match="generation_config.json: repetition_penalty"):
        sampling_defaults(bad, "model")
    assert sampling_defaults(bad, "openai") == {}


@pytest.fixture(scope="module")
def app(ray_cluster, model_dir):
    from ray import serve

    cfg = make_config(model_dir, pop_off_prefill=False)
    yield App(APP, deploy(ray_cluster, APP, cfg), cfg.model_name())
    serve.delete(APP)


def test_the_server_samples_with_the_models_defaults(app):
    """Unset, the model's top_k 1 makes three sampled choices the greedy answer; a request that
    sets top_k 0 samples from the whole vocabulary and its choices differ from it."""
    def answers(**body) -> list[str]:
        r = httpx.post(app.chat_url, json={"model": app.model, "messages": [{"role": "user", "content": QUESTION}],
                                           "max_tokens": 8, **body}, timeout=120)
        assert r.status_code == 200, r.text
        return [c["message"]["content"] for c in r.json()["choices"]]

    [greedy] = answers(temperature=0)
    assert answers(n=3) == [greedy] * 3
    assert answers(n=3, top_k=None, seed=5) == [greedy] * 3
    sampled = answers(n=3, top_k=0, seed=5)
    assert all(a != greedy for a in sampled), sampled
