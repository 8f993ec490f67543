"""service/engine over the real tiny model: the decode scheduler's token stream, the detokenizer."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from popserve.models.decoder import FullDecoder
from popserve.models.prefill import PrefillRequest, PrunedPrefill
from popserve.models.prompt import PromptBuilder
from popserve.models.sampling import SamplingParams
from popserve.service.engine.detokenize import Detokenizer
from popserve.service.errors import BadRequest, ServeError
from popserve.service.engine.scheduler import DecodeScheduler

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def stage_pair(qwen_dir):
    prefill = PrunedPrefill(qwen_dir, 1 / 3, dtype="float32")
    decoder = FullDecoder(qwen_dir, 1 / 3, dtype="float32", max_seqs=2, max_seq_len=256)
    handoff = prefill.prefill([PrefillRequest(torch.arange(10, 40))])[0]
    return decoder, handoff


async def _messages(scheduler, handoff) -> list[list]:
    return [m async for m in scheduler.generate(handoff, SamplingParams(max_new_tokens=NEW_TOKENS))]


@pytest.mark.parametrize("interval, sizes", [(1, [1] * NEW_TOKENS), (3, [1, 3, 3, 3]), (4, [1, 4, 4, 1])])
def test_stream_interval_groups_the_tokens_after_the_first(stage_pair, interval, sizes):
    """The first token goes out alone (TTFT), then `interval` at a time; the tokens are the
    decoder's own greedy ones and the last message carries the finish reason."""
    decoder, handoff = stage_pair
    want = decoder.generate([handoff], SamplingParams(max_new_tokens=NEW_TOKENS))[0]
    messages = asyncio.run(_messages(DecodeScheduler(decoder, (), max_waiting=4, stream_interval=interval), handoff))
    assert [len(m) for m in messages] == sizes
    events = [e for m in messages for e in m]
    assert [e.token_id for e in events] == want
    assert [e.finish_reason for e in events] == [None] * (NEW_TOKENS - 1) + ["length"]
    # the first also says how many prompt tokens were cached; no logprobs were asked for
    assert [e.cached_tokens for e in events] == [0] + [None] * (NEW_TOKENS - 1)
    assert all(e.logprobs is None for e in events)
    assert decoder.num_running == 0


def test_n_choices_decode_from_one_handoff(stage_pair):
    """n = 2: both choices decode from the one handoff (one prefill), their events told apart by
    index; seeded, choice 0 is the request's seed and choice 1 the next seed, as the decoder gives
    them alone; greedy, the choices are the same. Then every slot is free again."""
    decoder, handoff = stage_pair

    async def choices(params, n):
        scheduler = DecodeScheduler(decoder, (), max_waiting=4)
        got: dict[int, list] = {}
        async for message in scheduler.generate(handoff, params, n):
            for e in message:
                got.setdefault(e.index, []).append(e)
        return got

    seeded = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=11)
    got = asyncio.run(choices(seeded, 2))
    alone = [decoder.generate([handoff], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=s))[0]
             for s in (11, 12)]
    assert [[e.token_id for e in got[i]] for i in (0, 1)] == alone and alone[0] != alone[1]
    assert [[e.finish_reason for e in got[i]][-1] for i in (0, 1)] == ["length", "length"]
    greedy = asyncio.run(choices(SamplingParams(max_new_tokens=NEW_TOKENS), 2))
    assert [e.token_id for e in greedy[0]] == [e.token_id for e in greedy[1]]
    with pytest.raises(BadRequest, match="max_running_seqs"):  # more choices than slots could never run
        asyncio.run(choices(seeded, decoder.max_seqs + 1))
    assert decoder.num_running == 0


def test_a_choice_ends_at_its_stop_string_in_decode_and_frees_its_slot(stage_pair, qwen_dir):
    """With n = 2 and a stop string that seeded choice 0 writes early, decode ends that choice at
    the token completing it ("stop") and frees its slot, while choice 1 runs on; the Ingress, which
    cuts the text, cannot end one choice of two by closing the stream. Without the tokenizer, stop
    strings are refused."""
    decoder, handoff = stage_pair
    tokenizer = PromptBuilder(qwen_dir).tokenizer
    seeded = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=11)
    first, second = [decoder.generate([handoff], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=s))[0]
                     for s in (11, 12)]
    stop = tokenizer.decode(first[1:3])  # written by choice 0 at its 2nd and 3rd tokens
    assert stop.strip() and "\ufffd" not in stop and stop not in tokenizer.decode(second)
    ends = [len(first[:k]) for k in range(1, len(first) + 1) if stop in tokenizer.decode(first[:k])][0]

    async def run():
        scheduler = DecodeScheduler(decoder, (), max_waiting=4, tokenizer=tokenizer)
        got: dict[int, list] = {}
        running = []
        async for message in scheduler.generate(handoff, seeded, 2, (stop,)):
            for e in message:
                got.setdefault(e.index, []).append(e)
            running.append(decoder.num_running)
        return got, running, scheduler.tokens_out

    got, running, decoded = asyncio.run(run())
    assert [e.token_id for e in got[0]] == first[:ends] and got[0][-1].finish_reason == "stop"
    assert [e.token_id for e in got[1]] == second and got[1][-1].finish_reason == "length"
    assert decoded == ends + NEW_TOKENS and running[ends] == 1  # choice 0's slot was freed at its stop
    with pytest.raises(ValueError, match="tokenizer"):
        asyncio.run(_collect(DecodeScheduler(decoder, (), max_waiting=4).generate(handoff, seeded, 1, (stop,))))
    assert decoder.num_running == 0


def test_a_failing_stop_string_check_ends_its_own_request_only(stage_pair, qwen_dir):
    """A detokenizer that raises (a tokenizer bug on some token) ends the request whose stop strings
    it checks with an error and frees its slot; the request decoded beside it in the same batch
    runs to its end, and the scheduler serves the next one."""
    decoder, handoff = stage_pair
    tokenizer = PromptBuilder(qwen_dir).tokenizer

    class Broken(type(tokenizer)):
        def decode(self, *args, **kwargs):
            raise RuntimeError("tokenizer bug")

    broken = copy.copy(tokenizer)
    broken.__class__ = Broken
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)  # long enough to outlive the failure
    alone = decoder.generate([handoff], params)[0]

    async def run():
        scheduler = DecodeScheduler(decoder, (), max_waiting=4, tokenizer=broken)
        plain = asyncio.create_task(_collect(scheduler.generate(handoff, params)))
        await asyncio.sleep(0)
        with pytest.raises(ServeError, match="tokenizer bug"):
            await _collect(scheduler.generate(handoff, params, 1, ("zz",)))
        running = decoder.num_running  # the plain request alone, still decoding
        tokens = [e.token_id for message in await plain for e in message]
        again = [e.token_id for message in await _collect(scheduler.generate(handoff, params)) for e in message]
        return running, tokens, again

    running, tokens, again = asyncio.run(run())
    assert running == 1 and tokens == alone and again == alone
    assert decoder.num_running == 0


async def _collect(stream) -> list:
    return [m async for m in stream]


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_closed_while_its_message_fills_frees_the_slot(stage_pair, n):
    """The caller goes away (Serve closes the generator) while decode is still collecting the
    next stream_interval tokens: the sequence (each of the n choices) leaves the batch at the next step."""
    decoder, handoff = stage_pair

    async def scenario():
        scheduler = DecodeScheduler(decoder, (), max_waiting=4, stream_interval=8)
        stream = scheduler.generate(handoff, SamplingParams(max_new_tokens=200), n)
        first = await stream.__anext__()
        await asyncio.sleep(0.05)  # a few steps in: the next message is filling
        running_before = decoder.num_running
        await stream.aclose()
        for _ in range(100):
            if decoder.num_running == 0:
                break
            await asyncio.sleep(0.01)
        return first, running_before, decoder.num_running, scheduler.steps

    first, running_before, running_after, steps = asyncio.run(scenario())
    assert 1 <= len(first) <= n and running_before == n and running_after == 0
    assert steps < 200  # it did not run to max_new_tokens


def test_detokenizer_takes_a_message_up_to_its_stop_string(qwen_dir):
    """feed_message turns a message of several tokens into text: all of it without a stop, the
    text before the stop string (and the tokens up to the one that completed it) with one."""
    tokenizer = PromptBuilder(qwen_dir).tokenizer
    ids = tokenizer.encode("the red circle is left of the blue square", add_special_tokens=False)
    items = [(i, None) for i in ids]
    whole = Detokenizer(tokenizer, [])
    first, rest = whole.feed_message(items[:1]), whole.feed_message(items[1:])
    assert first[1:] == (1, None) and rest[1:] == (len(ids) - 1, None)
    assert first[0] + rest[0] == tokenizer.decode(ids)
    cut = Detokenizer(tokenizer, ["blue"])
    text, used, reason = cut.feed_message(items)
    assert (text, reason) == ("the red circle is left of the ", "stop")
    assert tokenizer.decode(ids[:used]).endswith("blue") and not tokenizer.decode(ids[:used - 1]).endswith("blue")
    last = Detokenizer(tokenizer, [])
    assert last.feed_message(items[:2] + [(ids[2], "length")]) == (tokenizer.decode(ids[:3]), 3, "length")


def test_stop_strings_count_from_min_tokens_on(qwen_dir):
    """vLLM's min_tokens: no stop string ends an answer before it has that many tokens; one
    written later still does."""
    tokenizer = PromptBuilder(qwen_dir).tokenizer
    text = "the red circle is left of the blue square"
    ids = tokenizer.encode(text, add_special_tokens=False)
    items = [(i, None) for i in ids[:-1]] + [(ids[-1], "length")]
    assert Detokenizer(tokenizer, ["red"]).feed_message(items)[0] == "the "
    assert Detokenizer(tokenizer, ["red"], min_tokens=5).feed_message(items) == (text, len(ids), "length")
    later = Detokenizer(tokenizer, ["red", "blue"], min_tokens=5)
    assert later.feed_message(items)[0] == "the red circle is left of the "


def test_the_earliest_stop_string_wins_whatever_their_order(qwen_dir):
    """One token that completes two stop strings at once ("circle" ends "circle" and "ircle"):
    the answer is cut at the one that starts first, in either order of the request's list."""
    tokenizer = PromptBuilder(qwen_dir).tokenizer
    ids = tokenizer.encode("the red circle is left of the blue square", add_special_tokens=False)
    word = next(w for w in (tokenizer.decode([i]).strip() for i in ids) if len(w) >= 4)
    text = tokenizer.decode(ids)
    for stops in ([word[1:], word], [word, word[1:]]):
        got = Detokenizer(tokenizer, stops).feed_message([(i, None) for i in ids])
        assert got[0::2] == (text[:text.index(word)], "stop"), (word, stops, got)


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer, as Gemma-3's and Llama's are built: byte-fallback tokens
    <0x00>..<0xFF> for what the vocabulary lacks, '▁' for spaces, and a decoder that strips the
    first leading space. The checkpoints' tiny tokenizers are byte-level BPE, which has neither."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.,!?", "▁", "▁t", "he", "▁the", "▁a", "é", "ü"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer (as Qwen's is) with one token, " \\xe2", that ends in the first
    byte of a three-byte character: the checkpoints' tiny vocabularies have no such token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    space, e2 = bytes_to_unicode()[ord(" ")], bytes_to_unicode()[0xE2]
    vocab[space + e2] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(space, e2)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_a_stop_string_before_an_incomplete_character_ends_the_answer_at_once():
    """Byte-level BPE: a token can complete a stop string and begin a character in one go. The text
    before the incomplete character is final, so the stop string ends the answer at that token,
    not when (if ever) the character completes."""
    tokenizer = _byte_level_tokenizer()
    ids = tokenizer.encode("ax \u201cy", add_special_tokens=False)  # the quote is e2 80 9c
    pieces = tokenizer.convert_ids_to_tokens(ids)
    at = next(i for i, p in enumerate(pieces) if len(p) == 2)  # " \xe2", which completes "x "
    detok = Detokenizer(tokenizer, ["x "])
    assert "".join(detok.feed(i) for i in ids[:at]) == "a" and not detok.stopped  # "x" is held back
    assert detok.feed(ids[at]) == "" and detok.stopped
    assert Detokenizer(tokenizer, ["x "]).feed_message([(i, None) for i in ids]) == ("a", at + 1, "stop")
    other = Detokenizer(tokenizer, ["zz"])  # no stop string there: the character completes as before
    assert "".join(other.feed(i) for i in ids) + other.flush() == "ax \u201cy" and not other.stopped


def _tokenizers(qwen_dir, gemma_dir):
    return {"qwen3-vl": PromptBuilder(qwen_dir).tokenizer, "gemma3": PromptBuilder(gemma_dir).tokenizer,
            "byte-fallback": _byte_fallback_tokenizer()}


def _random_answers(tokenizer, n: int, length: int, seed: int):
    """Answers a model could sample: real text, and ids drawn at random, half of them from the
    tokens that hold one byte or part of a character (so that characters split, complete late or
    never), with special tokens in between."""
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    partial = [i for t, i in vocab.items() if t.startswith("<0x") or "\ufffd" in tokenizer.decode([i])]
    every = list(vocab.values())
    yield tokenizer.encode("the café über 漢字 🙂 the end.", add_special_tokens=False)
    for _ in range(n):
        picks = torch.randint(1 << 30, (length, 2), generator=g).tolist()
        yield [(partial if a % 2 and partial else every)[b % len(partial if a % 2 and partial else every)]
               for a, b in picks]


def test_the_detokenizer_streams_exactly_what_decoding_the_whole_answer_gives(qwen_dir, gemma_dir):
    """Decoding a window per token, not the whole answer, changes no text: on byte-level BPE
    (both checkpoints' tokenizers) and on a byte-fallback tokenizer with a leading-space strip,
    over real text and random answers full of split characters, invalid bytes and special tokens,
    every step's text is the whole decode of the answer so far (when not held back), the stream
    never sends what later tokens change, and the end is the whole decode."""
    for name, tokenizer in _tokenizers(qwen_dir, gemma_dir).items():
        for ids in _random_answers(tokenizer, n=150, length=24, seed=len(name)):
            detok, streamed = Detokenizer(tokenizer, []), ""
            for k, token_id in enumerate(ids, 1):
                streamed += detok.feed(token_id)
                whole = tokenizer.decode(ids[:k], skip_special_tokens=True)
                if detok.text != whole:  # held back: an incomplete character or a byte run
                    assert whole.endswith("\ufffd") or detok._in_byte_run, (name, ids[:k])
                final = tokenizer.decode(ids, skip_special_tokens=True)
                assert final.startswith(streamed), (name, ids, k)
            streamed += detok.flush()
            assert streamed == final.rstrip("\ufffd") or (streamed == final), (name, ids)


def test_the_detokenizer_decodes_a_short_window_per_token_however_long_the_answer(qwen_dir):
    """A 600-token answer: each token decodes a window of a few tokens (decoding the whole answer
    per token made the Ingress's work grow with the square of the answer's length)."""
    tokenizer = PromptBuilder(qwen_dir).tokenizer
    ids = tokenizer.encode("the red circle is left of the blue square, and über it 漢字. " * 40,
                           add_special_tokens=False)[:600]
    widths = []

    class Counting:  # the real tokenizer, with the length of every decode recorded
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, some, **kw):
            widths.append(len(some))
            return tokenizer.decode(some, **kw)

    detok = Detokenizer(Counting(), ["no such stop"])
    text = "".join(detok.feed(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids) and len(ids) == 600
    assert max(widths) <= 8 and sum(widths) < 6 * len(ids), (max(widths), sum(widths))


def test_text_held_back_at_the_end_still_meets_the_stop_strings():
    """A byte-fallback answer whose last character comes as byte tokens is held back until the
    answer ends; a stop string in that last part still ends the text before it, with "stop"."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("the 漢", add_special_tokens=False)
    assert all(f"<0x{b:02X}>" in tokenizer.convert_ids_to_tokens(ids[-3:])[i] for i, b in enumerate("漢".encode()))
    items = [(i, None) for i in ids[:-1]] + [(ids[-1], "length")]
    assert Detokenizer(tokenizer, []).feed_message(items) == ("the 漢", len(ids), "length")
    assert Detokenizer(tokenizer, ["漢"]).feed_message(items) == ("the ", len(ids), "stop")
