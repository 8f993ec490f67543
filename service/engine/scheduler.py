"""Continuous batching for one decode replica.

The scheduler decides, the runner (models.decoder.FullDecoder) executes: requests wait in a
bounded queue, join the running batch between two steps when a slot and KV room are free, and
leave when finished or aborted (client gone). One asyncio task owns the decoder, so adds, removes
and steps never race; the step itself runs in a worker thread to keep the event loop answering.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, NamedTuple, Optional, Union

from popserve.models.decoder import FullDecoder
from popserve.models.kv import HandoffMismatch, KVHandoff
from popserve.models.sampling import SamplingParams, TokenLogprobs

from ..errors import BadRequest, Overloaded, ServeError
from .detokenize import Detokenizer

log = logging.getLogger(__name__)


class TokenEvent(NamedTuple):
    """One generated token, as decode streams it to the Ingress."""
    token_id: int
    finish_reason: Optional[str]  # None while running
    cached_tokens: Optional[int] = None  # the first token's only: prompt tokens from the prefix cache
    logprobs: Optional[TokenLogprobs] = None  # when the request asked for them
    index: int = 0  # which of the request's n choices


@dataclass
class _Request:
    handoff: KVHandoff
    params: SamplingParams
    out: asyncio.Queue
    n: int = 1  # choices: sequences decoded from the one handoff
    choice_of: dict[int, int] = field(default_factory=dict)  # seq_id -> choice index, once admitted
    stop_texts: list[Detokenizer] = field(default_factory=list)  # one per choice, with stop strings
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def stopped_by_text(self, index: int, token_id: int) -> bool:
        """Whether this token completes a stop string in choice `index`'s text."""
        if not self.stop_texts:
            return False
        detok = self.stop_texts[index]
        detok.feed(token_id)
        return detok.stopped


class DecodeScheduler:
    def __init__(self, decoder: FullDecoder, stop_token_ids: tuple[int, ...], max_waiting: int,
                 stream_interval: int = 1, tokenizer=None):
        self.decoder = decoder
        self.tokenizer = tokenizer  # for stop strings
        self.stop_token_ids = stop_token_ids
        self.max_waiting = max_waiting
        self.stream_interval = stream_interval
        self.waiting: collections.deque[_Request] = collections.deque()
        self.active: dict[int, _Request] = {}
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.steps = 0
        self.busy_seconds = 0.0  # inside decode steps
        self.tokens_out = 0
        self.handoff_bytes = 0
        self.handoff_seconds = 0.0  # prefill finished -> KV in this replica's pool
        self.handoffs = 0
        self.prefilling = 0  # requests whose handoff is still being prefilled for this replica
        self._prefilling_seqs = 0  # their choices (n each): the slots they will ask for

    # ---- API for the deployment ------------------------------------------------------------
    async def generate(self, handoff: Union[KVHandoff, Awaitable[KVHandoff]],
                       params: SamplingParams, n: int = 1, stop: tuple[str, ...] = ()) -> AsyncIterator[list]:
        """Yields lists of TokenEvents as steps produce them: the first list as soon as there is
        a token (TTFT), then lists of at least stream_interval tokens (fewer only at the end),
        longer when the caller reads slower than the steps come. The first token's event also says
        how many prompt tokens the prefill took from its prefix cache. With n > 1, n sequences
        decode from the one handoff (the prompt is prefilled once), their events told apart by
        `index`, and the stream ends when all n have finished. A choice whose text reaches one of
        the `stop` strings ends there ("stop"), its slot freed at once: the Ingress, which cuts the
        text, cannot end one choice of several by closing the stream.

        `handoff` may still be coming (an awaitable: the prefill this replica asked for). The
        queue bound is checked first, so a full decode turns a request away before any prefill
        work, and a request being prefilled holds its place in the queue."""
        dec = self.decoder
        # Bounded: free slots (filled at the next step) plus max_waiting. Counting the free slots,
        # not asking can_admit(), keeps a burst that lands between two steps within the bound.
        free = max(0, dec.max_seqs - dec.num_running)
        refused = None
        if stop and self.tokenizer is None:
            refused = ValueError("stop strings need the scheduler's tokenizer")
        elif not 1 <= n <= dec.max_seqs:  # n choices run together: more than the slots never could
            refused = BadRequest(f"n must be in [1, {dec.max_seqs}] (engine.max_running_seqs)", param="n")
        elif len(self.waiting) + self.prefilling + n - 1 >= self.max_waiting + free:
            refused = Overloaded(f"decode is full: {dec.num_running} running, {len(self.waiting)} waiting, "
                                 f"{self.prefilling} in prefill")
        if refused:
            if inspect.iscoroutine(handoff):
                handoff.close()  # never started: no prefill work was asked for
            raise refused
        if inspect.isawaitable(handoff):
            self.prefilling += 1
            self._prefilling_seqs += n
            try:
                handoff = await handoff  # drops the response, so only the KV itself stays referenced
            finally:
                self.prefilling -= 1
                self._prefilling_seqs -= n
        try:
            dec.check(handoff)
        except HandoffMismatch as exc:
            raise ServeError(str(exc), code="handoff_mismatch") from None
        if handoff.num_tokens + 1 + params.max_new_tokens > dec.max_seq_len:
            raise BadRequest(f"prompt ({handoff.prompt_tokens} tokens) + max_tokens ({params.max_new_tokens}) "
                             f"exceeds the context length {dec.max_seq_len}", param="max_tokens",
                             code="context_length_exceeded")
        stop_texts = [Detokenizer(self.tokenizer, list(stop), params.min_tokens) for _ in range(n)] if stop else []
        req = _Request(handoff, params, asyncio.Queue(), n, stop_texts=stop_texts)
        cached = handoff.cached_tokens
        del handoff  # the request holds it until admission copies the KV into the pool
        self.waiting.append(req)
        self._ensure_loop()
        finished, running = False, n
        try:
            want = 1  # the first token goes out at once (TTFT)
            first = True
            while not finished:
                items = []
                while not finished and (len(items) < want or not req.out.empty()):
                    item = await req.out.get()
                    if isinstance(item, BaseException):
                        raise item
                    items.append(item)
                    running -= item.finish_reason is not None
                    finished = running == 0
                want = self.stream_interval
                if first:
                    items[0], first = items[0]._replace(cached_tokens=cached), False
                yield items
        finally:
            if not finished:  # client went away or an error: free the slot at the next step
                req.cancelled = True
                self._wake.set()

    def slots_spoken_for(self) -> bool:
        """Whether the running, waiting and in-prefill sequences (n per request) already fill every
        slot, so that a handoff asked for now (already counted among those in prefill) will wait."""
        waiting = sum(r.n for r in self.waiting)
        return self.decoder.num_running + waiting + self._prefilling_seqs > self.decoder.max_seqs

    def stats(self) -> dict:
        return {
            "running": self.decoder.num_running, "waiting": len(self.waiting), "prefilling": self.prefilling,
            "kv_bytes_in_use": self.decoder.kv_bytes_in_use, "kv_pool_bytes": self.decoder.kv_pool_bytes,
            "steps": self.steps, "busy_seconds": self.busy_seconds, "tokens_out": self.tokens_out, "handoffs": self.handoffs,
            "handoff_bytes": self.handoff_bytes, "handoff_seconds": self.handoff_seconds,
        }

    # ---- the loop --------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    def _drop_cancelled(self) -> None:
        for seq_id, req in list(self.active.items()):
            if req.cancelled:
                self.decoder.remove(seq_id)
                del self.active[seq_id]
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            if not self.decoder.can_admit(req.handoff.num_tokens, req.params.max_new_tokens, req.n):
                break
            self.waiting.popleft()
            try:
                for index in range(req.n):  # seeded choices differ from each other, reproducibly
                    params = req.params if req.params.seed is None or not index else \
                        dataclasses.replace(req.params, seed=req.params.seed + index)
                    req.choice_of[self.decoder.add(req.handoff, params, self.stop_token_ids)] = index
                self.handoffs += 1
                self.handoff_bytes += req.handoff.nbytes
                self.handoff_seconds += max(0.0, time.time() - req.handoff.created_at)
            except Exception as exc:  # a bad handoff fails its own request only
                self._remove(req.choice_of)
                req.out.put_nowait(exc)
                continue
            req.handoff = None  # the pool holds the KV now; let the shared-memory buffer go
            self.active.update(dict.fromkeys(req.choice_of, req))

    async def _loop(self) -> None:
        while True:
            try:
                await self._iteration()
            except Exception as exc:  # a bug in the bookkeeping: fail what it holds rather than hang it
                log.exception("decode scheduler iteration failed")
                error = ServeError(f"decode scheduler failed: {exc}")
                while self.waiting:
                    self.waiting.popleft().out.put_nowait(error)
                self._fail_active(error)
                await asyncio.sleep(0.01)  # a fault that repeats must not hold the event loop

    def _fail_active(self, error: ServeError) -> None:
        for req in {id(r): r for r in self.active.values()}.values():
            self._fail(req, error)

    def _fail(self, req: _Request, error: ServeError) -> None:
        """End one running request (all its choices) with an error and free its slots."""
        req.out.put_nowait(error)
        seq_ids = [s for s in req.choice_of if self.active.get(s) is req]
        self._remove(seq_ids)
        for s in seq_ids:
            del self.active[s]

    def _remove(self, seq_ids) -> None:
        """Free these sequences' slots, each on its own: one that fails to go does not keep the others."""
        for seq_id in seq_ids:
            try:
                self.decoder.remove(seq_id)
            except Exception:
                log.exception("could not free decode sequence %s", seq_id)

    async def _iteration(self) -> None:
        """Drop the cancelled, admit what fits, run one step and hand out its tokens."""
        self._drop_cancelled()
        self._admit()
        if not self.active:
            self._wake.clear()
            if not self.waiting:
                await self._wake.wait()
            else:  # waiting but nothing can run: cannot happen with an empty decoder
                await asyncio.sleep(0.001)
            return
        t0 = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.decoder.step)
        except Exception as exc:  # fail every running request, keep the replica alive
            self._fail_active(ServeError(f"decode step failed: {exc}"))
            return
        self.steps += 1
        self.busy_seconds += time.perf_counter() - t0
        for out in outputs:
            req = self.active.get(out.seq_id)
            if req is None:
                continue
            self.tokens_out += 1
            index = req.choice_of[out.seq_id]
            reason = out.finish_reason
            try:
                stopped = req.stopped_by_text(index, out.token)
            except Exception as exc:  # a detokenizer bug ends its own request, not the batch
                log.exception("stop strings failed for decode sequence %s", out.seq_id)
                self._fail(req, ServeError(f"stop strings failed: {exc}"))
                continue
            if stopped and not reason:
                reason = "stop"
                self.decoder.remove(out.seq_id)  # still running in the decoder: its slot is free now
            req.out.put_nowait(TokenEvent(out.token, reason, logprobs=out.logprobs, index=index))
            if reason:
                del self.active[out.seq_id]
        await asyncio.sleep(0)  # let arrivals and cancellations in between steps
