"""The prefill's prefix cache (models/prefix_cache.py): reused KV is the KV prefill would compute.

* A prompt that shares whole 32-token blocks with an earlier one prefills only the rest; its
  handoff equals a cache-less prefill's (float32, 1e-5) and decodes to the same greedy tokens,
  for both families (Gemma-3's sliding windows and bidirectional image blocks included), alone
  and batched beside misses and a prompt cached to its last token.
* An image is part of the key: the same text with another image (or an image of unknown content)
  reuses nothing from that image's first token on; the same image is reused past it. So is the
  request's cache salt: another salt reuses nothing.
* The cache stays within its bytes, dropping a prefix's tail before its head.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from popserve.models.decoder import FullDecoder  # noqa: E402
from popserve.models.encoder import VisionEncoder  # noqa: E402
from popserve.models.prefill import PrefillRequest, PrunedPrefill  # noqa: E402
from popserve.models.prefix_cache import (BLOCK_TOKENS, ImageSpan, PrefixCache, block_keys,  # noqa: E402
                                          shared_blocks_tokens)
from popserve.models.prompt import PromptBuilder  # noqa: E402
from popserve.models.sampling import SamplingParams  # noqa: E402

SYSTEM = "You are a careful assistant who answers questions about pictures and stories. " * 4
LEAD = "Look closely at the picture, then answer in full sentences. " * 3
IMAGE = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype("uint8"))
OTHER_IMAGE = Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["qwen3-vl", "gemma3"])
def stack(request, tiny_dirs):
    d = tiny_dirs[request.param]
    return SimpleNamespace(pb=PromptBuilder(d), enc=VisionEncoder(d), plain=PrunedPrefill(d),
                           cached=PrunedPrefill(d, prefix_cache_bytes=2**30),
                           dec=FullDecoder(d, max_seqs=4, max_seq_len=512))


def request(s, question, image=None, key="image-a"):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    prompt = s.pb.build([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                        [image] if image is not None else None)
    feats = s.enc.encode_pixels(prompt.pixels)
    for f in feats:
        f.key = key
    return PrefillRequest(prompt.input_ids, prompt.mm_token_type_ids, feats)


def shared_blocks(a: PrefillRequest, b: PrefillRequest) -> int:
    """Tokens of b's t_1..t_{N-1} in whole blocks that a's t_1..t_{N-1} has too."""
    return shared_blocks_tokens(a.input_ids[:-1], b.input_ids[:-1])


def first_image_token(s, r: PrefillRequest) -> int:
    return int((r.input_ids == s.enc.family.image_token_id).nonzero()[0])


def assert_same_handoffs(s, got, want):
    for g, w in zip(got, want):
        assert g.kept == w.kept and g.prompt_tokens == w.prompt_tokens and g.rope_delta == w.rope_delta
        torch.testing.assert_close(g.kv, w.kv, atol=1e-5, rtol=1e-5)
    greedy = SamplingParams(max_new_tokens=8)
    assert s.dec.generate(list(got), greedy) == s.dec.generate(list(want), greedy)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_a_shared_prefix_is_reused_and_changes_nothing(stack, with_image):
    s = stack
    img = IMAGE if with_image else None
    first = request(s, LEAD + "What colour is the sky in it?", img)
    second = request(s, LEAD + "And how many birds fly over the little house?", img)
    s.cached.prefill([first])
    hits_before = s.cached.cache.hit_tokens
    (got,) = s.cached.prefill([second])
    expected = shared_blocks(first, second)
    assert expected >= 2 * BLOCK_TOKENS  # the system prompt (and the image) at least
    if with_image:
        assert expected > first_image_token(s, second)  # the image's tokens are among the reused
    assert got.cached_tokens == expected and s.cached.cache.hit_tokens - hits_before == expected
    assert_same_handoffs(s, [got], s.plain.prefill([second]))


def test_hits_misses_and_a_fully_cached_prompt_batch_together(stack):
    s = stack
    seen = request(s, "Tell me about the house.", IMAGE)
    s.cached.prefill([seen])
    # t_1..t_{N-1} of `whole` is cached to its last token when its length is a multiple of the block
    whole = next(r for r in (request(s, "Tell me about the house" + "!" * i, IMAGE) for i in range(64))
                 if (r.input_ids.numel() - 1) % BLOCK_TOKENS == 0)
    s.cached.prefill([whole])
    batch = [request(s, "Something new entirely, with no picture at all", None, None),
             request(s, "Tell me about the garden behind the house, at length.", IMAGE), whole]
    stats = s.cached.cache.stats()
    peeked = [s.cached.cached_tokens(r) for r in batch]  # what the stage's batch budget sees
    assert s.cached.cache.stats() == stats  # a peek counts no hit and changes nothing
    got = s.cached.prefill(batch)
    assert peeked == [h.cached_tokens for h in got]
    assert got[0].cached_tokens == shared_blocks(seen, batch[0])  # the system prompt only
    assert got[1].cached_tokens == shared_blocks(seen, batch[1]) > got[0].cached_tokens
    assert got[2].cached_tokens == got[2].num_tokens  # nothing left to compute
    assert_same_handoffs(s, got, s.plain.prefill(batch))


@pytest.mark.parametrize("key", ["image-b", None], ids=["other-image", "unknown-content"])
def test_an_image_is_part_of_the_key(stack, key):
    s = stack
    question = "What is drawn in this picture, exactly?"
    s.cached.prefill([request(s, question, IMAGE, "image-a")])
    other = request(s, question, OTHER_IMAGE if key else IMAGE, key)
    (got,) = s.cached.prefill([other])
    start = first_image_token(s, other)
    assert got.cached_tokens == start // BLOCK_TOKENS * BLOCK_TOKENS  # nothing from the image's block on
    assert_same_handoffs(s, [got], s.plain.prefill([other]))
    again = request(s, question, IMAGE, "image-a")
    assert s.cached.prefill([again])[0].cached_tokens > start


def test_a_cache_salt_keeps_prompts_apart(stack):
    """vLLM's cache_salt: the same prompt under another salt reuses nothing (no salt at all:
    tests/test_service.py::test_cache_salt_keeps_tenants_apart)."""
    s = stack

    def salted(salt):
        r = request(s, "Only this test sends these words, about tenants and salts. " * 3, IMAGE)
        r.cache_salt = salt
        return r

    s.cached.prefill([salted("tenant-a")])
    whole = (salted("tenant-a").input_ids.numel() - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert [s.cached.prefill([salted(t)])[0].cached_tokens for t in ("tenant-b", "tenant-a")] == [0, whole]


def test_block_keys_name_everything_before_them():
    ids = torch.arange(5 * BLOCK_TOKENS + 7)
    keys = block_keys(ids, [])
    assert len(keys) == 5 and len(set(keys)) == 5
    changed = ids.clone()
    changed[BLOCK_TOKENS + 3] += 1  # a token of block 1: blocks 1.. change, block 0 does not
    assert [a == b for a, b in zip(keys, block_keys(changed, []))] == [True, False, False, False, False]
    image = ImageSpan(2 * BLOCK_TOKENS + 5, 3 * BLOCK_TOKENS + 2, "a")
    with_a, with_b = block_keys(ids, [image]), block_keys(ids, [ImageSpan(image.start, image.end, "b")])
    assert with_a[:2] == keys[:2] and with_a[2] != keys[2]
    assert [a == b for a, b in zip(with_a, with_b)] == [True, True, False, False, False]
    assert block_keys(ids, [ImageSpan(image.start, image.end, None)]) == keys[:2]
    salted = block_keys(ids, [], "tenant")
    assert len(salted) == 5 and not set(salted) & set(keys) and salted == block_keys(ids, [], "tenant")


def test_the_cache_stays_within_its_bytes_and_drops_tails_first():
    kv = torch.randn(2, 2, 1, 6 * BLOCK_TOKENS, 4)
    block_bytes = kv[:, :, :, :BLOCK_TOKENS].numel() * kv.element_size()
    cache = PrefixCache(4 * block_bytes)
    keys_a = block_keys(torch.arange(6 * BLOCK_TOKENS), [])
    cache.insert(keys_a, kv)  # six blocks into room for four: the head stays
    assert cache.bytes == 4 * block_bytes and len(cache.blocks) == 4
    n, got = cache.lookup(keys_a, kv.shape[3])
    assert n == 4 * BLOCK_TOKENS and torch.equal(got, kv[:, :, :, :n])
    keys_b = block_keys(torch.arange(6 * BLOCK_TOKENS) + 1000, [])
    cache.insert(keys_b[:2], kv)  # two more: the least recently used tail of `a` goes
    assert cache.bytes == 4 * block_bytes
    assert cache.lookup(keys_a, kv.shape[3])[0] == 2 * BLOCK_TOKENS
    assert cache.lookup(keys_b, kv.shape[3])[0] == 2 * BLOCK_TOKENS
    assert cache.lookup(keys_a, BLOCK_TOKENS + 5)[0] == BLOCK_TOKENS  # never more than asked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_serve.sh runs it on a lent one)")
def test_reuse_on_a_gpu_gives_the_kv_prefill_computes_there(tiny_dirs):
    d = tiny_dirs["qwen3-vl"]
    s = SimpleNamespace(pb=PromptBuilder(d), enc=VisionEncoder(d), plain=PrunedPrefill(d, device="cuda"),
                        cached=PrunedPrefill(d, device="cuda", prefix_cache_bytes=2**30))
    first, second = (request(s, LEAD + q, IMAGE) for q in ("What colour is it?", "Is it large?"))
    s.cached.prefill([first])
    (got,) = s.cached.prefill([second])
    assert got.kv.is_cuda and got.cached_tokens == shared_blocks(first, second) > 0
    assert next(iter(s.cached.cache.blocks.values())).is_cuda  # the cache lives on the replica's device
    torch.testing.assert_close(got.kv, s.plain.prefill([second])[0].kv, atol=1e-4, rtol=1e-4)
