"""The shipped, trained SynthVQA models (models/checkpoints/, see docs/trained-models.md)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from popserve.models import synthvqa
from popserve.models.checkpoint import default_model_dir, shipped_models_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = shipped_models_dir() / "default"
CHECKPOINTS = {"qwen3-vl": shipped_models_dir() / "qwen3-vl-shapes", "gemma3": shipped_models_dir() / "gemma3-shapes"}
DEMO_REQUEST = ROOT / "docs" / "trained" / "demo_request.json"
HELDOUT_N = 50
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def heldout():
    return synthvqa.make_dataset(HELDOUT_N, synthvqa.HELDOUT_SEED)


def test_generator_is_deterministic_and_disjoint_from_training():
    a, b = synthvqa.make_dataset(20, synthvqa.HELDOUT_SEED), synthvqa.make_dataset(20, synthvqa.HELDOUT_SEED)
    assert [(s.question, s.answer, s.image.tobytes()) for s in a] == [(s.question, s.answer, s.image.tobytes()) for s in b]
    train = synthvqa.make_dataset(20, 0)
    assert [s.question for s in a] != [s.question for s in train]
    assert synthvqa.normalize("  Two Points. ") == "two points"


@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_checkpoints_are_shipped_and_load(family):
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    d = CHECKPOINTS[family]
    assert (d / "config.json").exists(), f"{d} missing: the trained checkpoints are part of the repo"
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert size < 15 * 2**20, f"{d} is {size / 2**20:.1f} MiB"
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.get_text_config().num_hidden_layers >= 12
    proc = AutoProcessor.from_pretrained(d)
    eot = "<|im_end|>" if family == "qwen3-vl" else "<end_of_turn>"
    eos = GenerationConfig.from_pretrained(d).eos_token_id
    assert proc.tokenizer.convert_tokens_to_ids(eot) in (eos if isinstance(eos, list) else [eos])


def test_default_is_the_shipped_trained_model():
    assert (DEFAULT / "config.json").exists()
    assert not DEFAULT.is_symlink()
    assert default_model_dir() == DEFAULT or default_model_dir().resolve() == DEFAULT.resolve()


# ---- single process: the deployed stage runners, full model -----------------------------------
@pytest.fixture(scope="module")
def answerer():
    import torch

    from popserve.models.train import Answerer

    torch.set_num_threads(1)
    return Answerer(DEFAULT, pop_ratio=0.0)


def test_default_model_answers_heldout_in_process(answerer, heldout):
    texts = []
    for i in range(0, len(heldout), 10):
        texts += answerer.answer(heldout[i: i + 10])
    wrong = [(s.question, s.answer, t) for s, t in zip(heldout, texts) if not synthvqa.is_correct(t, s.answer)]
    assert 1 - len(wrong) / len(heldout) >= MIN_ACCURACY, wrong


def test_demo_in_process(answerer):
    demo = synthvqa.demo_sample()
    assert synthvqa.is_correct(answerer.answer([demo])[0], demo.answer)


# ---- over HTTP: the disaggregated server ------------------------------------------------------
@pytest.fixture(scope="module")
def trained_url(ray_cluster):
    from popserve_testing import deploy, server_config

    return deploy(ray_cluster, "trained", server_config(DEFAULT))


def _ask(url, body) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("pop", [False, True], ids=["full-model", "pop"])
def test_default_model_answers_heldout_over_http(trained_url, heldout, pop):
    """The issue's target with the full model; and the same through the POP-pruned prefill (the
    server's default ratio), so the disaggregated POP path keeps the accuracy on trained weights."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(s):
        body = {"model": "default", "messages": s.openai_messages(), "max_tokens": 16, "temperature": 0,
                "pop": pop}
        return _ask(trained_url, body)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, heldout))
    wrong = [(s.question, s.answer, t) for s, t in zip(heldout, texts) if not synthvqa.is_correct(t, s.answer)]
    assert 1 - len(wrong) / len(heldout) >= MIN_ACCURACY, wrong


def test_demo_request_is_the_generators_demo():
    """docs/trained/demo_request.json is synthvqa's fixed-seed demo (pixels compared: PNG bytes may vary by zlib)."""
    from popserve.models.chat_rows import parse_row

    body = json.loads(DEMO_REQUEST.read_text())
    demo = synthvqa.demo_sample()
    row = parse_row(body, ROOT)
    assert row.messages == demo.messages()
    assert [im.tobytes() for im in row.images] == [demo.image.tobytes()]
    assert body["model"] == "default"


def test_readme_demo_request_is_served(trained_url):
    """The exact demo request is served (200, a non-empty greedy answer that stops at eos)."""
    body = json.loads(DEMO_REQUEST.read_text())
    r = httpx.post(f"{trained_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"].strip() and choice["finish_reason"] == "stop"


def test_readme_demo_request(trained_url):
    """docs/trained-models.md's curl: exactly docs/trained/demo_request.json (POP at the default
    ratio), and the same with "pop": false, answer the demo question correctly."""
    body = json.loads(DEMO_REQUEST.read_text())
    demo = synthvqa.demo_sample()
    assert synthvqa.is_correct(_ask(trained_url, body), demo.answer)
    assert synthvqa.is_correct(_ask(trained_url, {**body, "pop": False}), demo.answer)
