"""Sampling and the decoder's continuous-batching bookkeeping.

Seeded sampling is reproducible (alone or batched with others) and differs from greedy; stop tokens
end a sequence with "stop", the token budget with "length"; removing a sequence frees its slot and
KV, and the sequences left behind keep decoding exactly as they would alone. Logprobs are the
model's own distribution; logit bias and presence / frequency penalties follow OpenAI's
definitions, per sequence of a batch.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from popserve.models.decoder import DecoderFull, FullDecoder  # noqa: E402
from popserve.models.prefill import PrefillRequest, PrunedPrefill  # noqa: E402
from popserve.models.prompt import PromptBuilder  # noqa: E402
from popserve.models.sampling import SamplingParams, TokenHistory, adjust_logits, sample  # noqa: E402

SEEDED = dict(temperature=0.8, top_p=0.9, top_k=20, seed=7)
PROMPTS = [
    "Tell me a story about the sea and a boy who lived near it.",
    "Count the red circles.",
    "Where did the old man go every morning after he found the white square in the sand?",
]


@pytest.fixture(scope="module", params=["qwen3-vl", "gemma3"])
def stack(request, tiny_dirs):
    d = tiny_dirs[request.param]
    pb = PromptBuilder(d)
    pre = PrunedPrefill(d, pop_ratio=1 / 3)
    prompts = [pb.build([{"role": "user", "content": p}]) for p in PROMPTS]
    s = SimpleNamespace(dir=d, pre=pre, dec=FullDecoder(d, pop_ratio=1 / 3, max_seqs=3, max_seq_len=160))
    s.handoffs = lambda: pre.prefill([PrefillRequest(p.input_ids) for p in prompts])
    yield s
    assert s.dec.num_running == 0


def run_to_end(dec):
    """Step until nothing runs; per sequence, its tokens and finish reasons in order."""
    out = {}
    while dec.num_running:
        for o in dec.step():
            out.setdefault(o.seq_id, []).append((o.token, o.finish_reason))
    return out


def test_seeded_sampling_is_reproducible_and_not_greedy(stack):
    s = stack
    h = s.handoffs()[0]
    a = s.dec.generate([h], SamplingParams(max_new_tokens=16, **SEEDED))[0]
    b = s.dec.generate([h], SamplingParams(max_new_tokens=16, **SEEDED))[0]
    greedy = s.dec.generate([h], SamplingParams(max_new_tokens=16))[0]
    other_seed = s.dec.generate([h], SamplingParams(max_new_tokens=16, **{**SEEDED, "seed": 8}))[0]
    assert len(a) == 16 and a == b
    assert a != greedy
    assert a != other_seed
    # A sequence's samples depend on its own seed only, not on what else shares the batch.
    together = s.dec.generate(s.handoffs(), [SamplingParams(max_new_tokens=16, **SEEDED),
                                             SamplingParams(max_new_tokens=16, **{**SEEDED, "seed": 3}),
                                             SamplingParams(max_new_tokens=5)])
    assert together[0] == a


def test_stop_token_finishes_with_stop(stack):
    s = stack
    h = s.handoffs()[0]
    greedy = s.dec.generate([h], SamplingParams(max_new_tokens=12))[0]
    stop = greedy[3]
    first = greedy.index(stop)
    for params, extra in ((SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)), ()),
                          (SamplingParams(max_new_tokens=12), (stop,))):  # per request or per call
        sid = s.dec.add(h, params, stop_token_ids=extra)
        out = run_to_end(s.dec)[sid]
        assert [t for t, _ in out] == greedy[: first + 1]
        assert [r for _, r in out] == [None] * first + ["stop"]


def test_max_new_tokens_finishes_with_length(stack):
    s = stack
    h = s.handoffs()[0]
    sid = s.dec.add(h, SamplingParams(max_new_tokens=5))
    out = run_to_end(s.dec)[sid]
    assert len(out) == 5 and [r for _, r in out] == [None] * 4 + ["length"]
    assert s.dec.num_running == 0 and s.dec.kv_bytes_in_use == 0


def test_remove_frees_slot(stack):
    """A sequence holds one K and V per layer and cache index, a sliding layer (Gemma-3's; 8 in
    the tiny checkpoint) at most its window's; removing it frees them."""
    s = stack
    fam = s.dec.family
    h = s.handoffs()[0]

    def held(n: int) -> int:
        return sum(min(n, fam.sliding_window(t) or n) for t in fam.layer_types) * 2 * fam.num_kv_heads * fam.head_dim * 4

    sid = s.dec.add(h, SamplingParams(max_new_tokens=50))
    assert s.dec.num_running == 1 and s.dec.kv_bytes_in_use == held(h.num_tokens)
    s.dec.step()
    assert s.dec.kv_bytes_in_use == held(h.num_tokens + 1)
    entries = sum(min(fam.sliding_window(t) or s.dec.max_seq_len, s.dec.max_seq_len) for t in fam.layer_types)
    assert s.dec.kv_pool_bytes == s.dec.max_seqs * entries * 2 * fam.num_kv_heads * fam.head_dim * 4
    assert s.dec.remove(sid) is True
    assert s.dec.num_running == 0 and s.dec.kv_bytes_in_use == 0
    assert s.dec.remove(sid) is False  # already gone
    assert s.dec.step() == []


def test_removing_a_middle_sequence_keeps_the_others_exact(stack):
    """Slot compaction moves the last sequence into the freed slot: it must go on decoding exactly
    as it would alone."""
    s = stack
    hs = s.handoffs()
    alone = [s.dec.generate([h], SamplingParams(max_new_tokens=10))[0] for h in hs]
    ids = [s.dec.add(h, SamplingParams(max_new_tokens=10)) for h in hs]
    got = {i: [] for i in ids}
    for _ in range(3):
        for o in s.dec.step():
            got[o.seq_id].append(o.token)
    assert s.dec.remove(ids[1])
    assert s.dec.num_running == 2
    for i, toks in run_to_end(s.dec).items():
        got[i] += [t for t, _ in toks]
    assert got[ids[0]] == alone[0] and got[ids[2]] == alone[2]
    assert got[ids[1]] == alone[1][:3]


def test_admission_limits(stack):
    s = stack
    hs = s.handoffs()
    with pytest.raises(DecoderFull, match="max_seq_len"):
        s.dec.add(hs[0], SamplingParams(max_new_tokens=s.dec.max_seq_len))
    ids = [s.dec.add(h, SamplingParams(max_new_tokens=2)) for h in hs]
    assert not s.dec.can_admit(4, 2)
    with pytest.raises(DecoderFull, match="slots are busy"):
        s.dec.add(hs[0], SamplingParams(max_new_tokens=2))
    for i in ids:
        s.dec.remove(i)
    assert s.dec.num_running == 0 and s.dec.can_admit(4, 2)


# ---- sample() on crafted logits ------------------------------------------------------------------
def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])

    def draws(p, n=300):
        gen = p.generator()
        return {sample(logits, [p], [gen])[0][0] for _ in range(n)}

    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=0)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=3, seed=0)) == {0, 1, 2}
    # softmax([4,3,2,...]) = .64, .23, .09, ...: top_p 0.5 keeps only token 0, 0.8 tokens 0 and 1.
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0)) == {0, 1}
    assert sample(logits, [SamplingParams()], [None]) == ([0], [None])  # greedy, no logprobs asked


def test_sampled_tokens_follow_the_distribution_transformers_warpers_define():
    """Over 6000 draws, each token's frequency is its probability after transformers' own warpers
    in vLLM's order (temperature, min_p, top-k, top-p), for combinations of them; a seed repeats
    its draws."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    tied = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.5, 0.0, 0.0, -1.0, -2.0, -3.0]])  # bf16 logits tie often
    for logits, kw in ((logits, dict(temperature=0.7)), (logits, dict(temperature=1.3, top_k=5)),
                       (logits, dict(temperature=1.0, top_p=0.7)), (logits, dict(temperature=0.8, top_k=6, top_p=0.8)),
                       (logits, dict(temperature=1.0, min_p=0.2, top_p=0.9)), (tied, dict(temperature=1.0, top_k=3))):
        x = TemperatureLogitsWarper(kw["temperature"])(None, logits.clone())
        for name, warper in (("min_p", MinPLogitsWarper), ("top_k", TopKLogitsWarper), ("top_p", TopPLogitsWarper)):
            if name in kw:
                x = warper(kw[name])(None, x)
        want = torch.softmax(x[0], -1)
        p = SamplingParams(seed=9, **kw)
        gen = p.generator()
        draws = torch.tensor([sample(logits, [p], [gen])[0][0] for _ in range(6000)])
        freq = torch.bincount(draws, minlength=12) / 6000
        assert (freq - want).abs().max() < 0.025, (kw, freq, want)
        assert bool(((want == 0) <= (freq == 0)).all()), kw  # nothing outside the kept tokens
        again = p.generator()
        assert [sample(logits, [p], [again])[0][0] for _ in range(50)] == draws[:50].tolist()


def test_logits_without_a_distribution_are_an_error_not_a_token():
    """NaN logits, or a temperature so small that logits / temperature overflow, leave no
    distribution to draw from: an error (the decode step fails its batch), not an arbitrary token."""
    for logits, p in ((torch.full((1, 8), float("nan")), SamplingParams(temperature=1.0, seed=0)),
                      (torch.randn(1, 8) * 10, SamplingParams(temperature=1e-38, seed=0))):
        with pytest.raises(ValueError, match="cannot sample"):
            sample(logits, [p], [p.generator()])


def test_unseeded_sampling_leaves_global_rng_alone():
    """Regression: an unseeded request used to call torch.seed(), re-seeding the process-wide RNG
    (breaking every seeded computation that shares the process)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    g1 = SamplingParams(temperature=0.7).generator()
    g2 = SamplingParams(temperature=0.7).generator()
    assert torch.equal(torch.rand(4), expected)
    assert g1.initial_seed() != g2.initial_seed()  # still non-deterministic per request


def test_sampling_params_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(presence_penalty=2.1), dict(frequency_penalty=-2.5), dict(logit_bias={3: 101}),
                dict(logprobs=21), dict(logprobs=-1), dict(min_tokens=-1), dict(max_new_tokens=4, min_tokens=5),
                dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0.0), dict(repetition_penalty=2.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_logprobs_are_the_models_own_distribution_likeliest_first():
    """The chosen token's log-probability and the N likeliest, from the logits before bias,
    penalties and temperature (vLLM's default); rows that do not ask get None."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 5.0, 1.0, 0.0]])
    params = [SamplingParams(logprobs=3, logit_bias={3: 100}), SamplingParams()]
    tokens, logprobs = sample(logits, params, [None, None])
    want = torch.log_softmax(logits[0], -1)
    assert tokens == [3, 1] and logprobs[1] is None
    assert logprobs[0].logprob == pytest.approx(float(want[3]))  # the biased choice, at its own probability
    assert [i for i, _ in logprobs[0].top] == [0, 1, 2]
    assert [lp for _, lp in logprobs[0].top] == pytest.approx(want[:3].tolist())
    assert sample(logits, [SamplingParams(logprobs=0)] * 2, [None, None])[1][0].top == ()


def history_of(answer: list[int], prompt=None, max_new: int = 16) -> TokenHistory:
    history = TokenHistory(prompt, max_new, "cpu")
    for token in answer:  # as the decoder adds each generated token
        history.add(token)
    return history


def test_penalties_count_the_generated_tokens():
    """OpenAI's definitions: logit - frequency_penalty * count - presence_penalty * (count > 0),
    over the tokens generated so far; a row that asks for nothing is left as it is (no copy)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0]])
    generated = [[0, 0, 0, 2]]
    history = [history_of(generated[0])]
    for params, want in ((SamplingParams(frequency_penalty=0.5), [0.5, 1.5, 0.5, 0.0]),
                         (SamplingParams(presence_penalty=0.5), [1.5, 1.5, 0.5, 0.0]),
                         (SamplingParams(presence_penalty=0.25, frequency_penalty=-0.5, logit_bias={3: 2.5}),
                          [3.25, 1.5, 1.25, 2.5])):
        assert adjust_logits(logits, [params], generated, history=history)[0].tolist() == pytest.approx(want)
    assert adjust_logits(logits, [SamplingParams()], generated) is logits
    assert logits[0].tolist() == [2.0, 1.5, 1.0, 0.0]  # the step's logits are not modified
    greedy = SamplingParams(frequency_penalty=0.5)
    assert sample(logits, [greedy], [None], generated, history=history)[0] == [1]  # token 0 fell below token 1
    assert sample(logits, [greedy], [None], [[]], history=[history_of([])])[0] == [0]  # nothing generated yet
    with pytest.raises(ValueError, match="TokenHistory"):
        adjust_logits(logits, [greedy], generated)


def test_token_history_gives_the_penalties_of_the_whole_answer():
    """The history kept token by token gives, step after step, exactly the logits of the
    definitions computed afresh from the whole answer: transformers' repetition penalty over prompt
    and answer, then OpenAI's presence / frequency over the answer alone (a token of the prompt
    that the answer has not repeated is not counted), in a batch where only some rows penalise."""
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(3)
    vocab, steps = 50, 40
    prompt = torch.randint(0, vocab, (30,), generator=gen)
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(), SamplingParams(presence_penalty=-0.5, frequency_penalty=1.1)]
    histories = [TokenHistory(prompt, steps, "cpu"), None, TokenHistory(None, steps, "cpu")]
    answers: list[list[int]] = [[], [], []]
    for _ in range(steps):
        logits = torch.randn(3, vocab, generator=gen) * 3
        ours = adjust_logits(logits, params, answers, history=histories)
        for row in (0, 2):
            want = logits[row:row + 1].clone()
            if row == 0:
                want = RepetitionPenaltyLogitsProcessor(1.3)(torch.cat((prompt, torch.tensor(answers[0], dtype=torch.long)))[None], want)
            counts = torch.bincount(torch.tensor(answers[row], dtype=torch.long), minlength=vocab).float()
            want = want[0] - (params[row].frequency_penalty * counts + params[row].presence_penalty * (counts > 0))
            assert torch.equal(ours[row], want), row
        assert torch.equal(ours[1], logits[1])
        for row, h in enumerate(histories):
            token = int(torch.randint(0, vocab // 2, (1,), generator=gen))  # repeats, and prompt tokens
            answers[row].append(token)
            if h is not None:
                h.add(token)
    assert sorted(histories[2].ids.tolist()) == sorted(set(answers[2]))


def test_repetition_penalty_and_min_p_are_transformers_own():
    """repetition_penalty over the prompt's and the answer's tokens, and min_p, give what
    transformers' RepetitionPenaltyLogitsProcessor and MinPLogitsWarper give; min_p comes before
    top-k and top-p (vLLM's order); the penalty needs the tokens seen, and a row that does not ask
    is left alone."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, generator=gen) * 3
    prompt, answer = torch.tensor([3, 5, 5, 17, 30]), [[9, 3, 21], []]
    seen = history_of(answer[0], prompt)
    assert sorted(seen.ids.tolist()) == [3, 5, 9, 17, 21, 30]
    for penalty in (1.3, 0.7):
        params = [SamplingParams(repetition_penalty=penalty), SamplingParams()]
        ours = adjust_logits(logits, params, answer, history=[seen, None])
        ids = torch.cat((prompt, torch.tensor(answer[0])))[None]
        assert torch.equal(ours[0], RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[:1].clone())[0])
        assert torch.equal(ours[1], logits[1])
    with pytest.raises(ValueError, match="TokenHistory"):
        adjust_logits(logits[:1], [SamplingParams(repetition_penalty=1.3)], [[]])

    def drawn(small, **params) -> set[int]:
        p = SamplingParams(temperature=0.9, seed=1, **params)
        g = p.generator()
        return {sample(small, [p], [g])[0][0] for _ in range(600)}

    small = torch.tensor([[4.0, 3.5, 3.0, 1.0, 0.0, -1.0]])
    sizes = []
    for min_p in (0.03, 0.3, 0.7, 1.0):
        allowed = set(MinPLogitsWarper(min_p)(None, small / 0.9)[0].isfinite().nonzero().flatten().tolist())
        assert drawn(small, min_p=min_p) == allowed, min_p
        sizes.append(len(allowed))
    assert sizes == [4, 3, 1, 1]
    # probabilities .4 .3 .2 .1: min_p 0.3 first drops token 3, then top_p 0.75 of the rest keeps two;
    # top_p first would keep three, and min_p would not drop the third.
    assert drawn(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log() * 0.9, min_p=0.3, top_p=0.75) == {0, 1}


def test_a_decoder_applies_bias_and_penalties_per_sequence(stack):
    """A real batch of three: one sequence forced to one token by logit_bias, one greedy with
    strong penalties, one plain greedy. Each penalised step's choice is the best of the model's
    20 likeliest tokens after the penalties of the tokens before it (its logprobs say which they
    were), and the plain sequence decodes exactly as it does alone."""
    dec, handoffs = stack.dec, stack.handoffs()
    alone = dec.generate([handoffs[2]], SamplingParams(max_new_tokens=12))[0]
    forced = SamplingParams(max_new_tokens=12, logit_bias={150: 100.0})
    penalised = SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5, logprobs=20)
    ids = [dec.add(h, p) for h, p in zip(handoffs, [forced, penalised, SamplingParams(max_new_tokens=12)])]
    steps: dict[int, list] = {i: [] for i in ids}
    while dec.num_running:
        for out in dec.step():
            steps[out.seq_id].append(out)
    assert [o.token for o in steps[ids[0]]] == [150] * 12
    assert [o.token for o in steps[ids[2]]] == alone
    before, checked = [], 0
    for out in steps[ids[1]]:
        top = dict(out.logprobs.top)
        adjusted = {t: lp - 1.5 * before.count(t) - 0.5 * (t in before) for t, lp in top.items()}
        best = max(adjusted, key=adjusted.get)
        if adjusted[best] >= min(top.values()):  # no token outside the 20 can beat it
            assert out.token == best and out.logprobs.logprob == pytest.approx(top[best])
            checked += 1
        before.append(out.token)
    assert checked >= 10 and len(set(before)) > 1


def test_min_tokens_holds_back_stop_tokens_and_ignore_eos_drops_the_end_of_turn(stack):
    """vLLM's min_tokens and ignore_eos on a real decoder, with logit_bias pushing one token that
    the decoder treats as its end of turn: with min_tokens 5 the sequence ends at the 6th token
    ("stop"); with ignore_eos it runs to max_new_tokens ("length") on that token alone, unless the
    request names it in stop_token_ids, which still end it."""
    dec, handoffs = stack.dec, stack.handoffs()
    eos = 150
    pushed = dict(max_new_tokens=9, logit_bias={eos: 100.0})

    def run(**extra):
        dec.add(handoffs[0], SamplingParams(**pushed, **extra), stop_token_ids=(eos,))
        return next(iter(run_to_end(dec).values()))

    assert run() == [(eos, "stop")]
    held = run(min_tokens=5)
    assert [t for t, _ in held[:5]] != [eos] * 5 and eos not in [t for t, _ in held[:5]]
    assert held[5:] == [(eos, "stop")] and all(r is None for _, r in held[:5])
    assert run(ignore_eos=True) == [(eos, None)] * 8 + [(eos, "length")]
    assert run(ignore_eos=True, stop_token_ids=(eos,)) == [(eos, "stop")]
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    early = SamplingParams(min_tokens=2)
    assert adjust_logits(logits, [early], [[0]], [frozenset({2})])[0].tolist() == [1.0, 2.0, float("-inf")]
    assert adjust_logits(logits, [early], [[0, 1]], [frozenset({2})]) is logits  # long enough now
