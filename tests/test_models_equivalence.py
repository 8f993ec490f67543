"""Encode -> prefill -> decode against independent references built from transformers itself.

* Ratio 0 (POP off): token-exact with HF `generate` (text, one image, two images, a prompt far
  longer than Gemma-3's sliding window, three prompts of different lengths decoded in one batch),
  and a padded prefill batch gives the same KV as one prompt at a time.
* Ratio 1/3 (POP on): kept layers' KV equals the full model's; skipped layers' KV equals paper
  Eq. 14 computed here from HF's hidden state; generated tokens (and the boundary step's logits)
  equal a reference that makes HF's skipped layers identity for prompt tokens via forward hooks.
* Boundary step: weights only decode uses (skipped layers' MLP / O projection) leave the prefill
  handoff bit-identical but change the first generated token's logits.
"""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForImageTextToText, DynamicCache  # noqa: E402

from popserve.models.decoder import FullDecoder  # noqa: E402
from popserve.models.encoder import VisionEncoder  # noqa: E402
from popserve.models.prefill import PrefillRequest, PrunedPrefill  # noqa: E402
from popserve.models.prompt import PromptBuilder  # noqa: E402
from popserve.models.sampling import SamplingParams  # noqa: E402

POP = 1 / 3
NEW = 12  # new tokens per comparison
ATOL, RTOL = 2e-5, 1e-4


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


LONG_TEXT = (
    "Read this carefully. The old man walked down to the sea every morning, counted the boats, "
    "wrote the number on a small blue page, and then went home to the little house near the farm "
    "where his mother and father had lived. One day he found a large white circle drawn in the sand, "
    "and next to it a red square and a green triangle. Tell me what he thought."
)

CASES = {
    "text": ([{"role": "user", "content": "Tell me a story about the sea and a boy who lived near it."}], []),
    "one_image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                  [_image(1, (90, 70))]),
    "two_images": ([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
        {"type": "text", "text": "compare the two pictures"}]}],
        [_image(2, (64, 64)), _image(3, (120, 50))]),
    "long_text": ([{"role": "user", "content": LONG_TEXT}], []),
}


# ---- fixtures: every runner loaded once per family per module ---------------------------------
@pytest.fixture(scope="module", params=["qwen3-vl", "gemma3"])
def stack(request, tiny_dirs):
    d = tiny_dirs[request.param]
    hf = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    s = SimpleNamespace(
        family=request.param, dir=d, hf=hf,
        eos=tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos])),
        pb=PromptBuilder(d), enc=VisionEncoder(d),
        pre0=PrunedPrefill(d, pop_ratio=0.0), pre=PrunedPrefill(d, pop_ratio=POP),
        # One decoder built for 1/3 serves both: it must accept full-prefill (ratio 0) handoffs too.
        dec=FullDecoder(d, pop_ratio=POP, max_seqs=4, max_seq_len=256),
    )
    s.L = s.hf.config.get_text_config().num_hidden_layers
    s.k = s.pre.k
    yield s
    assert s.dec.num_running == 0


def hf_text(hf):
    return hf.model.language_model


def build(s, name):
    msgs, imgs = CASES[name]
    prompt = s.pb.build(msgs, imgs)
    batch = s.pb.processor(text=[s.pb.render(msgs)], images=imgs or None, return_tensors="pt")
    assert torch.equal(batch["input_ids"][0], prompt.input_ids)
    return prompt, batch


def request_for(s, prompt):
    return PrefillRequest(prompt.input_ids, prompt.mm_token_type_ids, s.enc.encode_pixels(prompt.pixels))


def hf_generate(s, batch, n=NEW, **sampling):
    if hasattr(s.hf.model, "rope_deltas"):
        s.hf.model.rope_deltas = None
    with torch.no_grad():
        out = s.hf.generate(**batch, max_new_tokens=n, do_sample=False, **sampling)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def ours_generate(s, handoffs, n=NEW, **sampling):
    plist = [SamplingParams(max_new_tokens=m, **sampling) for m in (n if isinstance(n, list) else [n] * len(handoffs))]
    out = s.dec.generate(handoffs, plist, stop_token_ids=s.eos)
    assert s.dec.num_running == 0
    return out


_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def prefix_inputs(batch):
    """Processor output cut to t_1..t_{N-1} (pixels and grids are whole: t_N is never an image)."""
    return {k: (v[:, :-1] if k in _SEQ_KEYS else v) for k, v in batch.items()}


class RecordingCache(DynamicCache):
    """An ordinary DynamicCache that also remembers, per layer, the K/V each attention produced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.record.setdefault(layer_idx, (key_states.detach().clone(), value_states.detach().clone()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def hf_prefix_forward(s, batch, k_skip=0):
    """HF forward over t_1..t_{N-1}; the last k_skip decoder layers made identity for these tokens by
    forward hooks (they still run their own attention on their input, so they write exactly the K/V
    of Eq. 14). Returns the cache and, captured by a hook, the hidden state entering layer L-k."""
    text = hf_text(s.hf)
    seen = {}

    def capture_h(mod, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    def identity(mod, args, kwargs, out):
        return args[0] if args else kwargs["hidden_states"]

    handles = [text.layers[s.L - s.k].register_forward_pre_hook(capture_h, with_kwargs=True)]
    for i in range(s.L - k_skip, s.L):
        handles.append(text.layers[i].register_forward_hook(identity, with_kwargs=True))
    if hasattr(s.hf.model, "rope_deltas"):
        s.hf.model.rope_deltas = None
    cache = RecordingCache(config=s.hf.config)
    try:
        with torch.no_grad():
            s.hf(**prefix_inputs(batch), cache=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return cache, seen


def hf_continue(s, cache, last_token, n, eos):
    """The full HF model from the boundary token t_N on, one token at a time, greedy.
    Returns tokens and the boundary step's logits."""
    tok, out, first_logits = int(last_token), [], None
    with torch.no_grad():
        for _ in range(n):
            logits = s.hf(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits[0, -1]
            if first_logits is None:
                first_logits = logits.clone()
            tok = int(logits.argmax())
            out.append(tok)
            if tok in eos:
                break
    return out, first_logits


def capture_first_logits(dec):
    """Logits of every decode step, via a forward hook on the decoder's LM head."""
    seen = []
    handle = dec.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.detach().float().clone()))
    return seen, handle


# ---- 1. ratio 0 == HF generate ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_full_prefill_matches_hf_generate(stack, name):
    s = stack
    prompt, batch = build(s, name)
    if name == "long_text":  # far beyond Gemma-3's 8-token sliding window
        assert prompt.num_tokens >= 60
    if name == "two_images":
        assert len(prompt.pixels) == 2
    req = request_for(s, prompt)
    if prompt.pixels:  # PIL path and pixel path of the encoder agree
        for a, b in zip(s.enc.encode(CASES[name][1]), req.images):
            assert a.grid_thw == b.grid_thw
            torch.testing.assert_close(a.data, b.data)
    [handoff] = s.pre0.prefill([req])
    assert handoff.skipped_layers == 0 and handoff.prompt_tokens == prompt.num_tokens
    assert max(handoff.kept) == prompt.num_tokens - 1 and handoff.kv.is_contiguous()  # full-attention layers: all
    ref = hf_generate(s, batch)
    [ours] = ours_generate(s, [handoff])
    assert len(ref) >= 4
    assert ours == ref


def test_reference_harness_matches_hf_generate(stack):
    """Sanity of the hand-written reference used for POP below: with nothing skipped, prefix
    forward + token-by-token continuation reproduces HF generate."""
    s = stack
    for name in ("text", "one_image"):
        _, batch = build(s, name)
        cache, _ = hf_prefix_forward(s, batch, k_skip=0)
        ours, _ = hf_continue(s, cache, batch["input_ids"][0, -1], NEW, s.eos)
        assert ours == hf_generate(s, batch)


def test_batch_of_three_matches_hf_one_by_one(stack):
    s = stack
    names = ("text", "one_image", "long_text")
    built = [build(s, n) for n in names]
    lengths = [p.num_tokens for p, _ in built]
    assert len(set(lengths)) == 3, lengths
    reqs = [request_for(s, p) for p, _ in built]

    together = s.pre0.prefill(reqs)  # one right-padded batch
    alone = [s.pre0.prefill([r])[0] for r in reqs]
    for a, b in zip(together, alone):
        assert a.kept == b.kept and a.kv.is_contiguous()
        torch.testing.assert_close(a.kv, b.kv, atol=ATOL, rtol=RTOL)
        assert (a.last_token, a.rope_delta, a.prompt_tokens) == (b.last_token, b.rope_delta, b.prompt_tokens)

    # Same for the POP runner (padding must not leak into the independent K/V projection).
    for a, b in zip(s.pre.prefill(reqs), [s.pre.prefill([r])[0] for r in reqs]):
        torch.testing.assert_close(a.kv, b.kv, atol=ATOL, rtol=RTOL)

    # Decoded together, with different lengths so sequences leave mid-batch and slots compact.
    budgets = [NEW, 6, 9]
    ours = ours_generate(s, together, budgets)
    for (_, batch), n, got in zip(built, budgets, ours):
        assert got == hf_generate(s, batch, n)


def test_repetition_penalty_matches_hf_generate(stack):
    """Greedy with repetition_penalty (over the prompt's tokens and the answer's) decodes what
    transformers' generate decodes with it, images included; and it changes some answer."""
    s, changed = stack, 0
    for name in ("text", "one_image", "long_text"):
        prompt, batch = build(s, name)
        [handoff] = s.pre0.prefill([request_for(s, prompt)])
        [ours] = ours_generate(s, [handoff], 12, repetition_penalty=1.6)
        assert ours == hf_generate(s, batch, 12, repetition_penalty=1.6), name
        changed += ours != ours_generate(s, [handoff], 12)[0]
    assert changed


# ---- 2. POP on: KV and tokens against independent references -----------------------------------
def qwen_positions(s, batch):
    """[3, 1, N-1] mRoPE positions of the prefix, from HF's own rope-index code."""
    pre = prefix_inputs(batch)
    if "image_grid_thw" not in pre:
        n = pre["input_ids"].shape[1]
        return torch.arange(n).view(1, 1, n).expand(3, 1, n)
    pos, _ = s.hf.model.get_rope_index(pre["input_ids"], mm_token_type_ids=pre["mm_token_type_ids"],
                                       image_grid_thw=pre["image_grid_thw"],
                                       attention_mask=pre["attention_mask"])
    return pos


def eq14_reference(s, h, batch):
    """Paper Eq. 14 for every skipped layer, from the HF model's own modules:
    u = input_layernorm(h); K = RoPE(k_norm(u W_K)); V = u W_V."""
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb as gemma_rope
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb as qwen_rope

    text = hf_text(s.hf)
    cfg = s.hf.config.get_text_config()
    S = h.shape[1]
    out = {}
    for l in range(s.L - s.k, s.L):
        layer = text.layers[l]
        attn = layer.self_attn
        u = layer.input_layernorm(h)
        k = attn.k_norm(attn.k_proj(u).view(1, S, cfg.num_key_value_heads, cfg.head_dim)).transpose(1, 2)
        v = attn.v_proj(u).view(1, S, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        if s.family == "gemma3":
            layer_type = cfg.layer_types[l]
            pos = torch.arange(S).view(1, S)
            cos, sin = text.rotary_emb(h, pos, layer_type)  # local and global layers differ
            _, k = gemma_rope(k, k, cos, sin)
        else:
            cos, sin = text.rotary_emb(h, qwen_positions(s, batch))  # mRoPE: 3-D positions
            _, k = qwen_rope(k, k, cos, sin)
        out[l] = (k[0], v[0])
    return out


@pytest.mark.parametrize("name", ["text", "one_image", "two_images"])
def test_pop_kv_kept_layers_and_eq14(stack, name):
    s = stack
    prompt, batch = build(s, name)
    req = request_for(s, prompt)
    [full] = s.pre0.prefill([req])
    [pop] = s.pre.prefill([req])
    L, k = s.L, s.k
    assert k == round(L * POP) == 2 and s.pre.num_kept == L - k
    assert pop.kept == full.kept and pop.skipped_layers == k
    pop_kv, full_kv = pop.layers(), full.layers()  # [2, kv heads, kept, head dim] each: the last `kept` tokens

    def tail(x, l):  # of a [kv heads, tokens, head dim] reference, what layer l's handoff keeps
        return x[:, x.shape[1] - pop.kept[l]:]

    # Kept layers: identical to full prefill (ours) and to the HF full model's cache.
    cache, seen = hf_prefix_forward(s, batch, k_skip=0)
    torch.testing.assert_close(pop_kv[: L - k], full_kv[: L - k], atol=ATOL, rtol=RTOL)
    for l in range(L):
        kh, vh = cache.record[l]
        torch.testing.assert_close(full_kv[l][0], tail(kh[0], l), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(full_kv[l][1], tail(vh[0], l), atol=ATOL, rtol=RTOL)

    # Skipped layers: Eq. 14 from h = hidden state leaving layer L-k-1. Qwen3-VL deepstack is added
    # after layers 0..D-1 only; with D <= L-k the pre-hook on layer L-k sees it already added.
    if s.family == "qwen3-vl":
        assert s.hf.config.vision_config.deepstack_visual_indexes and \
            len(s.hf.config.vision_config.deepstack_visual_indexes) <= L - k
    with torch.no_grad():
        ref = eq14_reference(s, seen["h"], batch)
    for l, (kr, vr) in ref.items():
        torch.testing.assert_close(pop_kv[l][0], tail(kr, l), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(pop_kv[l][1], tail(vr, l), atol=ATOL, rtol=RTOL)
        # Layer L-k sees h in both runs; deeper skipped layers do not write what the full model
        # writes (so this comparison can tell POP from full prefill).
        if l > L - k:
            assert not torch.allclose(pop_kv[l], full_kv[l], atol=1e-3)

    # Second, independent formulation: HF with skipped layers made identity by hooks.
    pop_cache, _ = hf_prefix_forward(s, batch, k_skip=k)
    for l in range(L):
        torch.testing.assert_close(pop_kv[l][0], tail(pop_cache.record[l][0][0], l), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(pop_kv[l][1], tail(pop_cache.record[l][1][0], l), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_pop_generation_matches_hook_reference(stack, name):
    """POP tokens == HF model whose skipped layers are identity for t_1..t_{N-1} (their K/V still
    written from their input), then the whole model from t_N on (boundary step)."""
    s = stack
    prompt, batch = build(s, name)
    [pop] = s.pre.prefill([request_for(s, prompt)])
    cache, _ = hf_prefix_forward(s, batch, k_skip=s.k)
    ref, ref_logits = hf_continue(s, cache, batch["input_ids"][0, -1], NEW, s.eos)

    seen, handle = capture_first_logits(s.dec)
    try:
        [ours] = ours_generate(s, [pop])
    finally:
        handle.remove()
    assert ours == ref
    torch.testing.assert_close(seen[0][0], ref_logits.float(), atol=1e-4, rtol=1e-4)


def test_pop_generation_differs_from_full_model(stack):
    """POP is not a no-op on these models: at least one prompt decodes differently from ratio 0,
    so the token-exact POP comparisons above have power."""
    s = stack
    differ = 0
    for name in CASES:
        prompt, _ = build(s, name)
        req = request_for(s, prompt)
        seen, handle = capture_first_logits(s.dec)
        try:
            a = ours_generate(s, s.pre0.prefill([req]))[0]
            b = ours_generate(s, s.pre.prefill([req]))[0]
        finally:
            handle.remove()
        differ += a != b
        assert not torch.allclose(seen[0], seen[len(a)], atol=1e-4)  # boundary-step logits differ
    assert differ >= 1


# ---- 3. boundary step ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perturbed(stack, tmp_path_factory):
    """A copy of the checkpoint whose skipped layers' MLP down_proj and O projection are changed:
    weights that POP's prefill never uses but decode does."""
    s = stack
    out = tmp_path_factory.mktemp(f"perturbed-{s.family}")
    model = AutoModelForImageTextToText.from_pretrained(s.dir, dtype=torch.float32)
    layers = hf_text(model).layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in range(s.L - s.k, s.L):
            for w in (layers[l].mlp.down_proj.weight, layers[l].self_attn.o_proj.weight):
                w.add_(torch.randn(w.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    for f in s.dir.iterdir():  # processor and tokenizer files
        if not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    del model
    return out


def test_boundary_step_uses_full_model(stack, perturbed):
    s = stack
    prompt, _ = build(s, "one_image")
    req = request_for(s, prompt)

    [orig] = s.pre.prefill([req])
    [pert] = PrunedPrefill(perturbed, pop_ratio=POP).prefill([req])
    assert torch.equal(pert.kv, orig.kv)  # prefill never touches those weights

    # Control: without POP the same perturbation does reach the prompt KV (layer L-k's MLP feeds
    # layer L-k+1), so the equality above is evidence of skipping, not of a no-op perturbation.
    [pert_full] = PrunedPrefill(perturbed, pop_ratio=0.0).prefill([req])
    [orig_full] = s.pre0.prefill([req])
    assert not torch.allclose(pert_full.layers()[s.L - 1], orig_full.layers()[s.L - 1], atol=1e-4)

    dec_p = FullDecoder(perturbed, pop_ratio=POP, max_seqs=1, max_seq_len=128)
    logits = []
    for dec, handoff in ((s.dec, orig), (dec_p, pert)):
        seen, handle = capture_first_logits(dec)
        try:
            dec.add(handoff, SamplingParams(max_new_tokens=1))
            [step] = dec.step()
        finally:
            handle.remove()
        assert step.finish_reason == "length" and dec.num_running == 0
        logits.append(seen[0][0])
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


# ---- 4. the decoder's lean layers ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decode_layers_equal_transformers_layers(tiny_dir, dtype):
    """FullDecoder's DecodeLayers (fused q/k/v and gate/up, SDPA called directly) give the logits of
    the checkpoint's own transformers layers bit for bit, step after step, two sequences at once."""
    from popserve.models.decode_layer import transformers_layers

    prompt = PromptBuilder(tiny_dir).build(*CASES["long_text"])
    handoff = PrunedPrefill(tiny_dir, pop_ratio=POP, dtype=dtype).prefill(
        [PrefillRequest(prompt.input_ids, prompt.mm_token_type_ids)])[0]
    dec = FullDecoder(tiny_dir, pop_ratio=POP, dtype=dtype, max_seqs=2, max_seq_len=256)
    seen, handle = capture_first_logits(dec)
    try:
        lean = dec.generate([handoff, handoff], SamplingParams(max_new_tokens=NEW))
        lean_logits = list(seen)
        seen.clear()
        dec.layers = transformers_layers(tiny_dir, dec.family, dec.dtype, dec.device)
        reference = dec.generate([handoff, handoff], SamplingParams(max_new_tokens=NEW))
    finally:
        handle.remove()
    assert lean == reference and len(lean[0]) == NEW
    assert len(lean_logits) == len(seen) == NEW
    assert all(torch.equal(a, b) for a, b in zip(lean_logits, seen))
