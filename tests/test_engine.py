"""service/engine over the real tiny model: the decode scheduler's token stream, the detokenizer."""
from __future__ import annotations

import asyncio

import pytest
import torch

from popserve.models.decoder import FullDecoder
from popserve.models.prefill import PrefillRequest, PrunedPrefill
from popserve.models.prompt import PromptBuilder
from popserve.models.sampling import SamplingParams
from popserve.service.engine.detokenize import Detokenizer
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
    assert [tok for m in messages for tok, *_ in m] == want
    assert [fin for m in messages for _, fin, *_ in m] == [None] * (NEW_TOKENS - 1) + ["length"]
    tuples = [t for m in messages for t in m]  # the first also says how many prompt tokens were cached
    assert tuples[0][2] == 0 and [len(t) for t in tuples] == [3] + [2] * (NEW_TOKENS - 1)
    assert decoder.num_running == 0


def test_a_stream_closed_while_its_message_fills_frees_the_slot(stage_pair):
    """The caller goes away (Serve closes the generator) while decode is still collecting the
    next stream_interval tokens: the sequence leaves the batch at the next step."""
    decoder, handoff = stage_pair

    async def scenario():
        scheduler = DecodeScheduler(decoder, (), max_waiting=4, stream_interval=8)
        stream = scheduler.generate(handoff, SamplingParams(max_new_tokens=200))
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
    assert len(first) == 1 and running_before == 1 and running_after == 0
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
