"""Virtual-gate importance (models/importance.py): the gated model is the real model at g = 1, its
gate gradients are right, a prefill gate at 0 is exactly POP's skipped layer, a decode gate at 0 is
exactly the layer removed from decode, and `popserve importance` writes what it promises."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from popserve.models.decoder import FullDecoder
from popserve.models.importance import GatedLM, Gates, GrowingCache, compute_importance, gated_layer, suggest_k
from popserve.models.prefill import PrefillRequest, PrunedPrefill
from popserve.models.prompt import PromptBuilder

VENV_BIN = Path(sys.executable).parent


def _image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _image_prompt(model_dir, lm: GatedLM, text="What shape is near the big red tree?", seed=0):
    builder = PromptBuilder(model_dir)
    pr = builder.build([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                       [_image(seed)])
    return pr, lm.prepare(pr.input_ids, pr.mm_token_type_ids, pr.pixels)


def _decode_logits(dec: FullDecoder, handoff, tokens: list[int]) -> torch.Tensor:
    """Production decoder, teacher-forced on `tokens`: logits of each step [len(tokens), V]."""
    from popserve.models.evaluate import decode

    return decode(dec, handoff, len(tokens), forced=tokens)[1]


# ---- the gated layer is the layer -------------------------------------------------------------
def test_gate_one_reproduces_each_hf_layer_exactly(tiny_dir):
    lm = GatedLM(tiny_dir)
    fam, text = lm.family, lm.text
    torch.manual_seed(0)
    x = torch.randn(1, 7, text.config.hidden_size)
    pe = fam.rotary(text, x, fam.batch_positions([torch.arange(7).view(1, 7)], 7))
    with torch.no_grad():
        for i, layer in enumerate(text.layers):
            t = fam.layer_types[i]
            want = layer(x, position_embeddings=pe[t], attention_mask=None)
            got = gated_layer(layer, x, torch.ones(1, 7, 1), position_embeddings=pe[t], attention_mask=None)
            assert torch.equal(got, want), f"layer {i}"
            # and the gate really gates: 0 is the identity
            off = gated_layer(layer, x, torch.zeros(1, 7, 1), position_embeddings=pe[t], attention_mask=None)
            assert torch.equal(off, x)
            assert not torch.allclose(want, x)


# ---- gradients --------------------------------------------------------------------------------
def _exact_fp64_norms(lm: GatedLM) -> int:
    """HF's RMSNorms compute in float32 even in a float64 model, which would drown central
    differences in rounding noise. Swap in the same formulas in float64 (checked against HF's)."""
    count = 0
    for mod in lm.text.modules():
        if "RMSNorm" not in type(mod).__name__:
            continue
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
        gemma = "Gemma" in type(mod).__name__  # Gemma scales by (1 + w), Qwen by w

        def forward(self, x, eps=eps, gemma=gemma):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return y * (1.0 + self.weight) if gemma else self.weight * y

        x = torch.randn(3, mod.weight.shape[0], dtype=torch.float64)
        want = mod(x)
        mod.forward = types.MethodType(forward, mod)
        torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
        count += 1
    return count


def test_gate_gradient_matches_finite_differences(tiny_dir):
    lm = GatedLM(tiny_dir, dtype="float64")
    assert _exact_fp64_norms(lm) >= 2 * lm.num_layers + 1
    _, p = _image_prompt(tiny_dir, lm, text="Count the circles.")
    L = lm.num_layers
    response = lm.run(p, Gates.ones(L), max_new_tokens=4).tokens
    g_pre, g_dec = lm.gate_gradients(p, response)

    def loss(pre, dec):
        with torch.no_grad():
            return float(lm.response_loss(p, response, Gates(pre, dec)))

    eps = 1e-5
    fd_pre, fd_dec = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    one = torch.ones(L, dtype=torch.float64)
    for l in range(L):
        e = torch.zeros(L, dtype=torch.float64)
        e[l] = eps
        fd_pre[l] = (loss(one + e, one) - loss(one - e, one)) / (2 * eps)
        fd_dec[l] = (loss(one, one + e) - loss(one, one - e)) / (2 * eps)
    scale = max(g_pre.abs().max(), g_dec.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(g_pre, fd_pre, rtol=1e-6, atol=1e-8 * scale)
    torch.testing.assert_close(g_dec, fd_dec, rtol=1e-6, atol=1e-8 * scale)
    # Prompt positions' output of the last layer feeds nothing: no LM head, and its own K/V come
    # from its input. So the last prefill gate has exactly zero gradient; the decode gates don't.
    assert g_pre[-1] == 0
    assert (g_dec.abs() > 0).all()
    assert (g_pre[:-1].abs() > 0).any()


# ---- gates at 0 are POP's mechanisms ----------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.34, 0.5])
def test_prefill_gate_zero_is_pops_skipped_layer_path(tiny_dir, ratio):
    lm = GatedLM(tiny_dir)
    pr, p = _image_prompt(tiny_dir, lm)
    pre = PrunedPrefill(tiny_dir, ratio)
    dec = FullDecoder(tiny_dir, ratio, max_seqs=1, max_seq_len=128)
    L, k, n = lm.num_layers, pre.k, p.num_tokens
    assert k >= 2
    handoff = pre.prefill([PrefillRequest(pr.input_ids, pr.mm_token_type_ids, p.images)])[0]

    def prompt_kv(gates):
        cache = GrowingCache(L)
        with torch.no_grad():
            first = lm.forward(p, p.input_ids, 0, gates, cache, logits_from=n - 1)
        kv = torch.stack([torch.stack([c[0][0, :, : n - 1], c[1][0, :, : n - 1]]) for c in cache.kv])
        return kv, first[0]

    pop = Gates.pruned(L, k)  # prefill gates 0 on the last k layers, decode gates 1
    kv, first = prompt_kv(pop)
    handoff_kv = handoff.layers()  # each layer's last handoff.kept[l] tokens (a window in sliding layers)

    def kept(kv):  # [L, 2, kv heads, n - 1, head dim] -> what the handoff keeps of it, layer by layer
        return [layer[:, :, n - 1 - m:] for layer, m in zip(kv, handoff.kept)]

    torch.testing.assert_close(kept(kv), handoff_kv, rtol=1e-5, atol=1e-5)
    forced = [5, 17, 99, 23, 64]
    want = _decode_logits(dec, handoff, forced)
    torch.testing.assert_close(first, want[0], rtol=1e-4, atol=1e-4)
    got = lm.run(p, pop, forced=forced, generate=False).forced_logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # Negative control: the full model's prompt K/V differ from POP's in the skipped layers only
    # (from the second skipped layer on: the first one's input is the same h).
    kv_full, first_full = prompt_kv(Gates.ones(L))
    torch.testing.assert_close(kept(kv_full)[: L - k + 1], handoff_kv[: L - k + 1], rtol=1e-5, atol=1e-5)
    assert max((a - b).abs().max() for a, b in zip(kept(kv_full)[L - k + 1:], handoff_kv[L - k + 1:])) > 1e-3
    assert (first_full - first).abs().max() > 1e-4


class _Identity(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden


def test_decode_gate_zero_is_the_layer_removed_from_decode(tiny_dir):
    lm = GatedLM(tiny_dir)
    pr, p = _image_prompt(tiny_dir, lm, seed=1)
    L, layer = lm.num_layers, 2
    pre = PrunedPrefill(tiny_dir, 0.0)
    dec = FullDecoder(tiny_dir, 0.0, max_seqs=1, max_seq_len=128)
    handoff = pre.prefill([PrefillRequest(pr.input_ids, pr.mm_token_type_ids, p.images)])[0]
    forced = [11, 300, 42, 7, 512, 9]
    full = _decode_logits(dec, handoff, forced)
    kept = dec.layers[layer]
    dec.layers[layer] = _Identity()  # layer 2 gone from decode (t_N onward); prefill intact
    try:
        removed = _decode_logits(dec, handoff, forced)
    finally:
        dec.layers[layer] = kept
    gates = Gates.ones(L)
    gates.dec[layer] = 0
    got = lm.run(p, gates, forced=forced, generate=False).forced_logits
    torch.testing.assert_close(got, removed, rtol=1e-4, atol=1e-4)
    assert (got - full).abs().max() > 1e-3  # and that is not the full model


# ---- importance and the suggested k -----------------------------------------------------------
def test_suggest_k_rule():
    # shares: 0.5 0.3 0.15 0.04 0.01 0.0 -> last 1: 0, last 2: 0.01, last 3: 0.05, last 4: 0.2
    pre = [50, 30, 15, 4, 1, 0]
    assert suggest_k(pre, max_k=5, threshold=0.05) == 3
    assert suggest_k(pre, max_k=5, threshold=0.02) == 2
    assert suggest_k(pre, max_k=2, threshold=0.5) == 2  # capped
    assert suggest_k(pre, max_k=5, threshold=0.0) == 1  # the last layer's share is exactly 0
    assert suggest_k([0, 0, 0], max_k=2) == 2


def test_compute_importance_is_stage_aware(qwen_dir):
    lm = GatedLM(qwen_dir)
    builder = PromptBuilder(qwen_dir)
    prompts = [_image_prompt(qwen_dir, lm, seed=3)[1]]
    pr = builder.build([{"role": "user", "content": "Tell me about the farm near the sea."}])
    prompts.append(lm.prepare(pr.input_ids))
    res = compute_importance(lm, iter(prompts), max_new_tokens=5, temperature=1.0, seed=0)
    L = lm.num_layers
    assert res["samples_used"] == 2 and len(res["pre"]) == len(res["dec"]) == L
    assert res["pre"][-1] == 0.0 and all(d > 0 for d in res["dec"])
    assert 1 <= res["mean_response_tokens"] <= 5
    # deterministic for a seed
    again = compute_importance(lm, iter(prompts), max_new_tokens=5, temperature=1.0, seed=0)
    assert again["pre"] == res["pre"] and again["dec"] == res["dec"]


# ---- the CLI ----------------------------------------------------------------------------------
def write_jsonl(path: Path) -> Path:
    """A few chat rows: text only, an image as a data URL, an image by relative path, a system turn
    and a trailing assistant turn (dropped)."""
    buf = io.BytesIO()
    _image(7).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    _image(8, (48, 80)).save(path.parent / "pic.png")
    rows = [
        {"messages": [{"role": "user", "content": "Name the color of the sun."}], "answer": "yellow"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What shape is this?"}]}],
         "answer": "circle"},
        {"messages": [{"role": "system", "content": "Be short."},
                      {"role": "user", "content": [{"type": "text", "text": "Count the trees:"},
                                                   {"type": "image", "path": "pic.png"}]},
                      {"role": "assistant", "content": "two"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(VENV_BIN / "popserve"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_importance_cli_end_to_end(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl")
    out = tmp_path / "imp"
    proc = run_cli("importance", "--model", str(qwen_dir), "--data", str(data), "--samples", "3",
                   "--max-new-tokens", "4", "--out", str(out))
    res = json.loads((out / "importance.json").read_text())
    L = 6
    assert res["samples_used"] == 3 and res["num_layers"] == L and res["family"] == "qwen3-vl"
    assert len(res["layers"]) == L and [r["layer"] for r in res["layers"]] == list(range(L))
    assert res["pre"][-1] == 0.0 and all(d > 0 for d in res["dec"])
    assert sum(res["pre_normalized"]) == pytest.approx(1.0) and sum(res["dec_normalized"]) == pytest.approx(1.0)
    assert res["suggested_k"] == suggest_k(res["pre"], res["max_k"], res["threshold"])
    assert 1 <= res["suggested_k"] <= res["max_k"] == 4  # tiny Qwen3-VL: deepstack feeds layers 0, 1
    assert res["paper_default_k"] == 2
    assert "paper default k = round(L/3) = 2" in proc.stdout and "suggested k =" in proc.stdout
    assert "importance" in proc.stderr and "3/3" in proc.stderr  # the tqdm bar
    with Image.open(out / "importance.png") as im:
        im.verify()
    with Image.open(out / "importance.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
