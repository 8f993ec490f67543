"""KV handoff compatibility, stage memory, and POP ratio validation.

* A decoder refuses (HandoffMismatch) handoffs from another model (another seed, or the same
  architecture with re-trained weights) or another pruning ratio, and always accepts full-prefill
  (ratio 0) handoffs of its own model (the A/B switch).
* Each stage holds only its share: prefill <= 75% of the text model at ratio 1/3 (exactly the kept
  layers + the skipped layers' input norm, K/V projections and k_norm + the embedding), the decoder
  no vision tower, the encoder no decoder layers; checked on everything the runner object reaches.
* POP ratios that skip every layer or a Qwen3-VL deepstack layer are refused with PopConfigError.
* On CPUs that compute bf16 natively, the bf16 prefill and decoder run oneDNN-prepacked Linears
  (models.loading.PackedLinear) and give the same KV and tokens as plain Linears, bit for bit.
"""
from __future__ import annotations

import gc
import os
import shutil
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from popserve.models.decoder import FullDecoder  # noqa: E402
from popserve.models.encoder import VisionEncoder  # noqa: E402
from popserve.models import loading  # noqa: E402
from popserve.models.kv import HandoffMismatch  # noqa: E402
from popserve.models.loading import PackedLinear  # noqa: E402
from popserve.models.pop import PopConfigError, skipped_layer_count  # noqa: E402
from popserve.models.prefill import PrefillRequest, PrunedPrefill  # noqa: E402
from popserve.models.prefix_cache import BLOCK_TOKENS, block_keys  # noqa: E402
from popserve.models.prompt import PromptBuilder  # noqa: E402
from popserve.models.sampling import SamplingParams  # noqa: E402

POP = 1 / 3
MESSAGES = [{"role": "user", "content": "Tell me a story about the sea and a boy who lived near it."}]


@pytest.fixture(scope="module", params=["qwen3-vl", "gemma3"])
def stack(request, tiny_dirs):
    d = tiny_dirs[request.param]
    pb = PromptBuilder(d)
    s = SimpleNamespace(family=request.param, dir=d, pb=pb, prompt=pb.build(MESSAGES),
                        pre=PrunedPrefill(d, pop_ratio=POP),
                        dec=FullDecoder(d, pop_ratio=POP, max_seqs=2, max_seq_len=128))
    yield s
    assert s.dec.num_running == 0


def handoff_from(prefill, prompt):
    return prefill.prefill([PrefillRequest(prompt.input_ids, prompt.mm_token_type_ids)])[0]


# ---- 4. handoff compatibility -----------------------------------------------------------------
def test_handoff_from_other_ratio_is_refused(stack):
    s = stack
    h = handoff_from(PrunedPrefill(s.dir, pop_ratio=0.5), s.prompt)
    assert h.skipped_layers == 3
    with pytest.raises(HandoffMismatch) as err:
        s.dec.add(h, SamplingParams(max_new_tokens=2))
    msg = str(err.value)
    assert "another model or POP config" in msg and "k=3" in msg and "[0, 2]" in msg
    assert s.dec.num_running == 0 and s.dec.kv_bytes_in_use == 0  # nothing half-admitted


def test_full_prefill_handoff_is_accepted_by_pop_decoder(stack):
    s = stack
    h0 = handoff_from(PrunedPrefill(s.dir, pop_ratio=0.0), s.prompt)
    h = handoff_from(s.pre, s.prompt)
    assert h0.fingerprint != h.fingerprint and h0.skipped_layers == 0
    assert s.dec.generate([h0, h], SamplingParams(max_new_tokens=3)) and s.dec.num_running == 0


def test_handoff_with_wrong_shape_or_dtype_is_refused(stack):
    s = stack
    h = handoff_from(s.pre, s.prompt)
    (*first, (last_layers, last_kept)) = h.groups
    bad = [
        ({"kv": h.kv.double()}, "float64"),
        ({"kv": h.kv[:-2 * h.kv_heads * h.head_dim * last_kept],  # the last layer missing
          "groups": (*first, (last_layers[:-1], last_kept))}, "expected"),
        ({"prompt_tokens": h.prompt_tokens + 1}, "expected"),  # a token short
        ({"kv_heads": h.kv_heads * 2, "head_dim": h.head_dim // 2}, "expected"),
    ]
    for fields, needle in bad:
        wrong = type(h)(**{**h.__dict__, **fields})
        with pytest.raises(HandoffMismatch, match=needle):
            s.dec.add(wrong, SamplingParams(max_new_tokens=2))
    assert s.dec.num_running == 0


def test_handoff_keeps_what_each_layer_reaches(stack):
    """Each layer hands decode only the keys its attention still reaches: all N-1 prompt tokens
    for full attention, the last window of them for Gemma-3's sliding layers (window 8 in the tiny
    checkpoint), cut from the very K/V a prefill computes (the prefix cache keeps them whole)."""
    s = stack
    fam = s.pre.family
    cached = PrunedPrefill(s.dir, pop_ratio=POP, prefix_cache_bytes=1 << 24)
    n = 2 * BLOCK_TOKENS  # the prompt's t_1..t_{N-1}: two whole blocks, so the cache holds them all
    ids = s.prompt.input_ids.repeat(n // s.prompt.num_tokens + 1)[: n + 1]
    h = cached.prefill([PrefillRequest(ids)])[0]
    assert h.num_tokens == n and len(cached.cache.blocks) == 2
    windows = fam.layer_windows
    assert h.kept == tuple(min(n, w or n) for w in windows)
    assert h.nbytes == 2 * h.kv_heads * h.head_dim * sum(h.kept) * h.kv.element_size()
    hit, whole = cached.cache.lookup(block_keys(ids[:-1], []), n)  # [L, 2, kv_heads, n, head_dim]
    assert hit == n and (s.family == "qwen3-vl" or h.nbytes < whole.numel() * whole.element_size() / 2)
    for i, kv in enumerate(h.layers()):
        assert kv.shape == (2, h.kv_heads, h.kept[i], h.head_dim)
        assert torch.equal(kv, whole[i, :, :, n - h.kept[i]:])


def test_handoff_from_another_seed_is_refused(qwen_dir, tmp_path_factory):
    from popserve.models.tiny import make_tiny

    other = make_tiny("qwen3-vl", "tiny", tmp_path_factory.mktemp("seed1"), seed=1)
    pb = PromptBuilder(other)
    h = handoff_from(PrunedPrefill(other, pop_ratio=POP), pb.build(MESSAGES))
    dec = FullDecoder(qwen_dir, pop_ratio=POP, max_seqs=1, max_seq_len=128)
    assert h.num_tokens + 1 + 2 <= dec.max_seq_len
    with pytest.raises(HandoffMismatch, match="another model or POP config"):
        dec.add(h, SamplingParams(max_new_tokens=2))
    # ...including its full-prefill handoffs: ratio 0 is accepted only from the decoder's own model.
    with pytest.raises(HandoffMismatch, match="another model"):
        dec.add(handoff_from(PrunedPrefill(other, pop_ratio=0.0), pb.build(MESSAGES)),
                SamplingParams(max_new_tokens=2))


def _retrained_copy(src, dst):
    """The same architecture and config with different weights (as after fine-tuning): the
    deepest layer's MLP changes; the safetensors header and file size stay byte-identical."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", "pt") as f:
        meta = f.metadata()
    state = load_file(src / "model.safetensors")
    [name] = [n for n in state if "layers.5.mlp.down_proj" in n]
    state[name] = state[name] + 0.05
    save_file(state, dst / "model.safetensors", metadata=meta)
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    return dst


def test_handoff_from_retrained_weights_is_refused(stack, tmp_path_factory):
    """Regression: the model fingerprint used to hash only config + the first 64 KiB of each weight
    file, so two checkpoints differing only in later tensors (a fine-tune) looked identical and
    the decoder accepted the other model's KV."""
    s = stack
    other = _retrained_copy(s.dir, tmp_path_factory.mktemp(f"retrained-{s.family}") / "ckpt")
    h = handoff_from(PrunedPrefill(other, pop_ratio=POP), s.prompt)
    try:
        with pytest.raises(HandoffMismatch, match="another model"):
            s.dec.add(h, SamplingParams(max_new_tokens=2))
    finally:
        for seq in list(s.dec.running):  # keep the shared decoder clean if it was (wrongly) admitted
            s.dec.remove(seq.seq_id)


# ---- 6. memory --------------------------------------------------------------------------------
def _reachable_modules(root) -> list[nn.Module]:
    """Every nn.Module the runner object keeps alive (through attributes, containers, closures),
    found by walking gc referents; python modules, classes and plain functions' globals are not
    followed."""
    seen, stack, mods = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType, str, bytes)):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):  # its closure and defaults, not its module globals
            stack.extend(c.cell_contents for c in (obj.__closure__ or ()) if c.cell_contents is not None)
            stack.extend([*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()])
            continue
        if isinstance(obj, nn.Module):
            mods.append(obj)
        if isinstance(obj, torch.Tensor):
            continue
        stack.extend(gc.get_referents(obj))
    return mods


def _named_params(modules):
    out = {}
    for m in modules:
        for name, p in m.named_parameters():
            out.setdefault(id(p), (type(m).__name__, name, p))
    return list(out.values())


def _hf_text_bytes(d):
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32)
    text = hf.model.language_model
    seen, total = set(), 0
    for p in [*text.parameters(), *hf.lm_head.parameters()]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return hf, total


def test_prefill_holds_at_most_three_quarters_of_text_model(stack):
    s = stack
    hf, text_bytes = _hf_text_bytes(s.dir)
    assert s.pre.param_bytes() <= 0.75 * text_bytes, (s.pre.param_bytes(), text_bytes)

    # Exactly the share POP needs: embedding, kept layers, and for skipped layers only
    # input_layernorm + k_proj + v_proj (+ k_norm); no final norm, no LM head.
    text = hf.model.language_model
    L, k = len(text.layers), s.pre.k
    need = [*text.embed_tokens.parameters()]
    for layer in text.layers[: L - k]:
        need += list(layer.parameters())
    for layer in text.layers[L - k:]:
        need += [*layer.input_layernorm.parameters(), *layer.self_attn.k_proj.parameters(),
                 *layer.self_attn.v_proj.parameters(), *layer.self_attn.k_norm.parameters()]
    assert s.pre.param_bytes() == sum(p.numel() * p.element_size() for p in need)

    names = {n for _, n, _ in _named_params(_reachable_modules(s.pre))}
    held_total = sum(p.numel() * p.element_size() for _, _, p in _named_params(_reachable_modules(s.pre)))
    assert held_total == s.pre.param_bytes()  # param_bytes counts everything the runner keeps alive
    for l in range(L - k, L):
        skipped = {n for n in names if n.startswith(f"layers.{l}.")}
        allowed = {f"layers.{l}.{x}.weight" for x in
                   ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm")}
        assert skipped and skipped <= allowed | {n.replace(".weight", ".bias") for n in allowed}, skipped
    assert not any("lm_head" in n or n.startswith("norm.") or "visual" in n or "vision" in n for n in names)


def test_decoder_holds_no_vision_tower(stack):
    s = stack
    held = _named_params(_reachable_modules(s.dec))
    assert held, "walk found no parameters at all"
    bad = [(cls, n) for cls, n, _ in held if "visual" in n or "vision" in n or "Vision" in cls
           or "Siglip" in cls or "MultiModalProjector" in cls]
    assert not bad
    assert sum(p.numel() * p.element_size() for _, _, p in held) == s.dec.param_bytes()
    _, text_bytes = _hf_text_bytes(s.dir)
    assert s.dec.param_bytes() == text_bytes  # the whole text model and LM head, nothing else


def test_encoder_holds_no_decoder_layers(stack):
    s = stack
    enc = VisionEncoder(s.dir)
    mods = _reachable_modules(enc)
    held = _named_params(mods)
    assert held and enc.param_bytes() == sum(p.numel() * p.element_size() for _, _, p in held)
    assert not any("DecoderLayer" in type(m).__name__ or "TextModel" in type(m).__name__ for m in mods)
    assert not [n for _, n, _ in held if "language_model" in n or "lm_head" in n or "embed_tokens" in n]


# ---- 7. POP ratio validation ------------------------------------------------------------------
def test_ratio_that_skips_every_layer_is_refused(tiny_dir):
    with pytest.raises(PopConfigError, match="would skip all 6 decoder layers"):
        PrunedPrefill(tiny_dir, pop_ratio=0.95)  # round(5.7) = 6
    with pytest.raises(PopConfigError, match="would skip all"):
        FullDecoder(tiny_dir, pop_ratio=0.95, max_seqs=1, max_seq_len=16)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(PopConfigError, match=r"pop_ratio must be in \[0, 1\)"):
            skipped_layer_count(6, bad)


def test_ratio_that_skips_a_deepstack_layer_is_refused(qwen_dir, gemma_dir):
    # Tiny Qwen3-VL: 6 layers, deepstack after layers 0 and 1 -> at most 4 skipped.
    assert PrunedPrefill(qwen_dir, pop_ratio=0.6).k == 4  # round(3.6): layers 2..5, allowed
    with pytest.raises(PopConfigError) as err:
        PrunedPrefill(qwen_dir, pop_ratio=0.8)  # round(4.8) = 5 would skip layer 1
    msg = str(err.value)
    assert "deepstack" in msg and "layer 1" in msg and "largest allowed k is 4" in msg
    with pytest.raises(PopConfigError, match="deepstack"):
        FullDecoder(qwen_dir, pop_ratio=0.8, max_seqs=1, max_seq_len=16)
    # Gemma-3 has no deepstack: the same ratio is fine there.
    assert PrunedPrefill(gemma_dir, pop_ratio=0.8).k == 5


# ---- 8. prepacked Linears (bf16 on CPU) -------------------------------------------------------
needs_native_bf16 = pytest.mark.skipif(not loading._can_pack(torch.bfloat16),
                                       reason="oneDNN has no native bf16 on this CPU (float32 is used there)")


@needs_native_bf16
@pytest.mark.parametrize("shape,bias", [((1, 64), False), ((8, 64), True), ((2, 37, 64), True)])
def test_packed_linear_is_bit_identical_to_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    out = PackedLinear(lin)(x)
    assert out.shape == (*shape[:-1], 96) and torch.equal(out, lin(x))


@needs_native_bf16
def test_bf16_stages_pack_their_linears_and_match_plain_linears(tiny_dir, monkeypatch):
    prompt = PromptBuilder(tiny_dir).build(MESSAGES)

    def run():
        pre = PrunedPrefill(tiny_dir, pop_ratio=POP, dtype="bfloat16")
        dec = FullDecoder(tiny_dir, pop_ratio=POP, dtype="bfloat16", max_seqs=2, max_seq_len=128)
        handoff = handoff_from(pre, prompt)
        return pre, dec, handoff, dec.generate([handoff], SamplingParams(max_new_tokens=12))

    pre, dec, handoff, tokens = run()
    assert not [m for m in [*pre.text.modules(), *dec.layers.modules(), *dec.text.modules()] if isinstance(m, nn.Linear)]
    embed = dec.text.embed_tokens.weight
    if isinstance(dec.lm_head, nn.Linear):  # tied to the embedding (Gemma-3): kept, not copied
        assert dec.lm_head.weight.data_ptr() == embed.data_ptr()
    else:
        assert isinstance(dec.lm_head, PackedLinear)
    _, text_bytes = _hf_text_bytes(tiny_dir)
    assert dec.param_bytes() == text_bytes // 2  # the packed weights counted, bf16 = half of float32

    monkeypatch.setattr(loading, "_can_pack", lambda dtype: False)
    _, plain_dec, plain_handoff, plain_tokens = run()
    assert any(isinstance(m, nn.Linear) for m in plain_dec.layers.modules())
    assert torch.equal(handoff.kv, plain_handoff.kv)
    assert tokens == plain_tokens and len(tokens[0]) == 12
