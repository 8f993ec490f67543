"""The decode step at CUDA graph shapes (models/decoder.py).

On a GPU, FullDecoder replays each step from a CUDA graph captured for a (batch, width) bucket: the
batch padded with idle slots, the attention width with masked keys. These tests hold the padded
step to the exact one on the CPU (both families: Gemma-3's sliding window meets the padded keys),
check that padding rows never touch a running sequence's KV, and, where a GPU is present, that the
replayed graphs give the padded step's logits bit for bit and the same tokens as eager steps.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from popserve.models.decoder import FullDecoder, batch_buckets, width_buckets  # noqa: E402
from popserve.models.prefill import PrefillRequest, PrunedPrefill  # noqa: E402
from popserve.models.prompt import PromptBuilder  # noqa: E402
from popserve.models.sampling import SamplingParams  # noqa: E402

POP = 1 / 3
WORDS = "the sea and a boy who lived near it told stories of ships and storms".split()


def handoffs(model_dir, counts, device="cpu", dtype="auto"):
    """KV handoffs of prompts of several lengths (so the running sequences differ in width)."""
    pb = PromptBuilder(model_dir)
    pre = PrunedPrefill(model_dir, pop_ratio=POP, dtype=dtype, device=device)
    prompts = [pb.build([{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(n))}])
               for n in counts]
    return pre.prefill([PrefillRequest(p.input_ids, p.mm_token_type_ids) for p in prompts])


def test_buckets_cover_every_shape_with_bounded_padding():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert width_buckets(4096) == [256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert width_buckets(6144) == [256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144]
    assert width_buckets(300) == [256, 300] and width_buckets(100) == [100]
    for limit in (100, 300, 4096, 6144):
        ws = width_buckets(limit)
        for need in range(1, limit + 1, 7):
            got = min(w for w in ws if w >= need)
            assert got <= max(256, 1.5 * need) or got == limit


def test_padded_step_matches_exact_step_and_leaves_running_kv_alone(tiny_dir):
    dec = FullDecoder(tiny_dir, pop_ratio=POP, max_seqs=5, max_seq_len=300)
    for h in handoffs(tiny_dir, [3, 9, 17]):
        dec.add(h, SamplingParams(max_new_tokens=6 if h.num_tokens > 20 else 12))
    assert dec.bucket(3, 40) == (4, 256)  # one padding row, and 216+ masked keys per row
    steps = 0
    while dec.running:
        live = {t: pool[:, :, : dec.num_running].clone() for t, pool in dec.pools.items()}
        exact = dec.next_logits("exact")
        padded = dec.next_logits("padded")
        assert padded.shape == exact.shape == (dec.num_running, exact.shape[-1])
        torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
        # The padding row wrote only its idle slot; the live slots hold what the exact step wrote.
        assert torch.equal(dec.next_logits("exact"), exact)
        for slot, seq in enumerate(dec.running):
            for t, pool in dec.pools.items():  # every filled entry but the one this step writes
                cap = dec.capacity[t]
                kept = [e for e in range(min(seq.length, cap)) if e != seq.length % cap]
                assert torch.equal(pool[:, :, slot, :, kept], live[t][:, :, slot, :, kept])
        dec.step()
        steps += 1
    assert steps == 12  # the longest sequence's tokens; slots compacted as the others finished
    with pytest.raises(ValueError, match="mode"):
        dec.next_logits("graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_replay_the_padded_step(tiny_dir):
    # float32, so that the exact-shape eager steps pick the same greedy tokens as the padded ones.
    dec = FullDecoder(tiny_dir, pop_ratio=POP, dtype="float32", device="cuda", max_seqs=5, max_seq_len=300)
    assert set(dec.graphs) == {(b, w) for b in (1, 2, 4, 5) for w in (256, 300)}
    eager = FullDecoder(tiny_dir, pop_ratio=POP, dtype="float32", device="cuda", max_seqs=5, max_seq_len=300,
                        cuda_graphs=False)
    assert not eager.graphs
    hs = handoffs(tiny_dir, [3, 9, 17], device="cuda", dtype="float32")
    params = SamplingParams(max_new_tokens=10)
    for h in hs:
        dec.add(h, params)
    replayed = dec.next_logits("auto")
    assert torch.equal(replayed, dec.next_logits("padded"))
    assert torch.equal(dec.next_logits("auto"), replayed)  # replays are repeatable
    while dec.running:
        dec.step()
    # Greedy tokens from graph steps equal eager steps at each step's own shape.
    assert dec.generate(hs, params) == eager.generate(hs, params)
