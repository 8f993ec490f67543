"""`popserve eval` (models/evaluate.py): the variants differ as they must, the production decoder
is teacher-forced correctly, the metrics mean what they say, and the CLI writes its reports."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from popserve.models.chat_rows import load_rows
from popserve.models.decoder import FullDecoder
from popserve.models.evaluate import (KINDS, ablation_gates, decode, evaluate, is_correct, kl_full_variant,
                                      parse_ratios, results_markdown)
from popserve.models.importance import GatedLM, Gates
from popserve.models.prefill import PrefillRequest, PrunedPrefill
from popserve.models.prompt import PromptBuilder

VENV_BIN = Path(sys.executable).parent


def _png(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def write_jsonl(path: Path) -> Path:
    buf = io.BytesIO()
    _png(1).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [
        {"messages": [{"role": "user", "content": "Name the color of the sun."}], "answer": "yellow"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What shape is this?"}]}],
         "answer": "circle"},
        {"messages": [{"role": "user", "content": "Tell me a story about a farm near the sea."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- data rows --------------------------------------------------------------------------------
def test_chat_rows_formats(tmp_path):
    _png(2, (40, 56)).save(tmp_path / "a.png")
    buf = io.BytesIO()
    _png(3).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "image_url", "image_url": "a.png"},
                                                   {"type": "text", "text": "same?"}]}], "answer": 3},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "dropped"}], "images": ["a.png"]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = load_rows(tmp_path / "d.jsonl")
    assert [im.size for im in a.images] == [(64, 64), (56, 40)] and a.answer == "3"
    assert a.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                       {"type": "text", "text": "same?"}]}]
    assert len(b.messages) == 1 and b.answer is None and b.images[0].size == (56, 40)
    assert len(load_rows(tmp_path / "d.jsonl", limit=1)) == 1

    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": '
                                        '[{"type": "image", "path": "missing.png"}]}]}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad2.jsonl:1"):
        load_rows(tmp_path / "bad2.jsonl")


# ---- metrics ----------------------------------------------------------------------------------
def test_metrics():
    assert is_correct("  Yellow, like gold", "yellow") and is_correct("circle", " Circle ")
    assert not is_correct("a yellow sun", "yellow")
    logits = torch.randn(3, 10)
    assert kl_full_variant(logits, logits) == 0.0
    other = logits.clone()
    other[:, 0] += 2
    kl = kl_full_variant(logits, other)
    ref, q = torch.log_softmax(logits.double(), -1), torch.log_softmax(other.double(), -1)
    assert kl == pytest.approx(float((ref.exp() * (ref - q)).sum(-1).mean())) and kl > 0
    # only the first M steps (the reference's rows) count
    assert kl_full_variant(logits[:1], other) == pytest.approx(float((ref[0].exp() * (ref[0] - q[0])).sum()))
    assert parse_ratios("0.2, 0.33,0.5") == [0.2, 0.33, 0.5]
    with pytest.raises(ValueError):
        parse_ratios("a,b")


# ---- the production decoder, teacher-forced ---------------------------------------------------
def test_decode_teacher_forcing(gemma_dir):
    builder = PromptBuilder(gemma_dir)
    pr = builder.build([{"role": "user", "content": "Tell me about the farm."}])
    pre = PrunedPrefill(gemma_dir, 0.34)
    dec = FullDecoder(gemma_dir, 0.34, max_seqs=1, max_seq_len=128)
    handoff = pre.prefill([PrefillRequest(pr.input_ids)])[0]
    with torch.inference_mode():
        tokens, logits = decode(dec, handoff, 6)
        assert len(tokens) == 6 and logits.shape[0] == 6
        assert tokens == logits.argmax(-1).tolist()  # greedy: each token is its step's argmax
        # forcing its own tokens reproduces its own distributions
        _, again = decode(dec, handoff, 6, forced=tokens)
        torch.testing.assert_close(again, logits)
        # forcing other tokens: same first step, different afterwards
        other = [(t + 1) % 1000 for t in tokens]
        _, forced = decode(dec, handoff, 6, forced=other)
        torch.testing.assert_close(forced[0], logits[0])
        assert (forced[1:] - logits[1:]).abs().max() > 1e-3
        assert dec.num_running == 0


# ---- the variants -----------------------------------------------------------------------------
def test_ablations_are_distinct_and_pop_is_the_mildest_at_one_layer(tiny_dir):
    """Constructed case k = 1: POP skips only the last layer, whose prompt outputs nothing reads,
    so POP is exact; every ablation changes the model. At k = 3 all four variants differ."""
    lm = GatedLM(tiny_dir)
    builder = PromptBuilder(tiny_dir)
    pr = builder.build([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count them."}]}],
                       [_png(5)])
    p = lm.prepare(pr.input_ids, pr.mm_token_type_ids, pr.pixels)
    L = lm.num_layers
    full = lm.run(p, Gates.ones(L), max_new_tokens=6)
    forced = full.tokens
    ref = full.logits

    def tf(gates):
        return lm.run(p, gates, forced=forced, generate=False).forced_logits

    kl1 = {"pop": kl_full_variant(ref, tf(Gates.pruned(L, 1)))}
    kl1.update({kind: kl_full_variant(ref, tf(g)) for kind, g in ablation_gates(L, 1).items()})
    assert kl1["pop"] < 1e-9
    for kind in ("pop-no-kv", "pop-no-boundary", "stage-agnostic"):
        assert kl1[kind] > 1e-6 and kl1[kind] > 1e3 * max(kl1["pop"], 1e-12), kl1

    # k = 0: every ablation is the full model
    for kind, g in ablation_gates(L, 0).items():
        assert kl_full_variant(ref, tf(g)) < 1e-9, kind

    k = 3
    outs = {"pop": tf(Gates.pruned(L, k)), **{kind: tf(g) for kind, g in ablation_gates(L, k).items()}}
    names = list(outs)
    for i, a in enumerate(names):
        assert kl_full_variant(ref, outs[a]) > 1e-6, a
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    # no independent K/V hurts more than POP on the same layers
    assert kl_full_variant(ref, outs["pop-no-kv"]) > kl_full_variant(ref, outs["pop"])


def test_evaluate_variants(gemma_dir, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "rows.jsonl"))
    res = evaluate(gemma_dir, rows, [0.0, 0.17, 0.5], max_new_tokens=4, kl_steps=4)
    by = {(v["kind"], v["ratio"]): v for v in res["variants"]}
    assert len(res["variants"]) == 1 + 3 * len(KINDS) and res["rows"] == 3
    full = by[("full", 0.0)]
    assert full["exact_match"] == 1.0 and full["mean_kl"] == 0.0 and full["answered_rows"] == 2
    # POP at ratio 0 is the full model, exactly (the same production code path)
    pop0 = by[("pop", 0.0)]
    assert pop0["k"] == 0 and pop0["exact_match"] == 1.0 and pop0["mean_kl"] == 0.0
    assert pop0["first_token_agreement"] == 1.0 and pop0["accuracy"] == full["accuracy"]
    for kind in KINDS[1:]:  # ... and so is every ablation at k = 0
        assert by[(kind, 0.0)]["exact_match"] == 1.0 and by[(kind, 0.0)]["mean_kl"] < 1e-9
    # k = 1: POP exact, the ablations not
    assert by[("pop", 0.17)]["k"] == 1 and by[("pop", 0.17)]["exact_match"] == 1.0
    assert by[("pop", 0.17)]["mean_kl"] < 1e-9
    for kind in KINDS[1:]:
        assert by[(kind, 0.17)]["mean_kl"] > 1e-6
    assert by[("pop", 0.5)]["k"] == 3 and by[("pop", 0.5)]["mean_kl"] > 1e-6
    assert by[("pop-no-kv", 0.5)]["mean_kl"] > by[("pop", 0.5)]["mean_kl"]
    # the gate model's POP agrees with the deployed POP
    assert all(d < 1e-4 for d in res["engine_check_max_abs_logprob_diff"].values())
    assert len(res["per_row"]) == 3 and set(res["per_row"][0]["outputs"]) == {v["name"] for v in res["variants"]}
    md = results_markdown(res)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 3 * len(KINDS)  # header, separator, full, 3 ratios x 4 kinds


# ---- the CLI ----------------------------------------------------------------------------------
def test_eval_cli_end_to_end(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl")
    out = tmp_path / "ev"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(VENV_BIN / "popserve"), "eval", "--model", str(qwen_dir), "--data", str(data),
                           "--ratios", "0.34,0.5", "--max-new-tokens", "4", "--kl-steps", "3", "--limit", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["rows"] == 2 and res["family"] == "qwen3-vl" and res["ratios"] == [0.34, 0.5]
    names = [v["name"] for v in res["variants"]]
    assert names[0] == "full" and len(names) == 1 + 2 * len(KINDS)
    assert {v["k"] for v in res["variants"] if v["kind"] == "pop"} == {2, 3}
    md = (out / "results.md").read_text()
    for kind in KINDS:
        assert f"| {kind} | 0.34 | 2 |" in md and f"| {kind} | 0.5 | 3 |" in md
    assert "| full | 0 | 0 | 100.0% | 100.0% | 0 |" in md
    assert "eval" in proc.stderr and "8/8" in proc.stderr  # tqdm: 2 prompts x (prepare, full, 2 ratios)
    for png in ("results.png",):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 600


def test_eval_cli_rejects_bad_ratio(qwen_dir, tmp_path):
    from popserve.service.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl")
    # Qwen3-VL tiny: 6 layers, deepstack into layers 0..1 -> at most 4 skippable
    assert main(["eval", "--model", str(qwen_dir), "--data", str(data), "--ratios", "0.9",
                 "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
