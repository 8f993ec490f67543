"""Batching for the encoder and prefill stages: one batch at a time, the next takes what waits.

Ray Serve's `@serve.batch` (2.60) forms a batch as soon as its wait ends, whether or not the
previous batch is still running; the formed batches then queue for their turn one by one. Calls
that arrive while a batch runs therefore each become a batch of their own, and a loaded stage runs
one prompt or image per forward (measured on the 2-core host: 1.0-1.1 prompts per prefill at 16
clients). Here the next batch is formed only when the stage is free, from everything that waited
meanwhile (up to `max_size`), which is what batching under load is for.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional


@dataclass
class _Call:
    item: Any
    size: int
    future: asyncio.Future


class Batcher:
    """`await batcher.submit(item, size)` -> run's result for that item.

    run(items) -> results (one per item, in order) is called for one batch at a time. When the
    stage is free and a call waits, the batch waits up to `wait_s` more for company (unless what
    waits already fills it), then takes the waiting calls in order while their sizes sum to at
    most `max_size` (a call larger than that runs alone). A call whose caller went away is dropped before its batch runs; an
    exception in run fails every call of its batch, and the next batch runs as usual."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int, wait_s: float = 0.002):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.waiting: collections.deque[_Call] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, item, size: int = 1):
        call = _Call(item, size, asyncio.get_running_loop().create_future())
        self.waiting.append(call)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return await call.future

    def _waiting_size(self) -> int:
        return sum(c.size for c in self.waiting if not c.future.done())

    def _take(self) -> list[_Call]:
        batch, total = [], 0
        while self.waiting:
            call = self.waiting[0]
            if call.future.done():  # its caller went away
                self.waiting.popleft()
                continue
            if batch and total + call.size > self.max_size:
                break
            batch.append(self.waiting.popleft())
            total += call.size
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            deadline = loop.time() + self.wait_s
            while self._waiting_size() < self.max_size and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self.run([c.item for c in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - the batch's callers get it, the stage goes on
                for c in batch:
                    if not c.future.done():
                        c.future.set_exception(exc)
                continue
            for c, result in zip(batch, results):
                if not c.future.done():
                    c.future.set_result(result)
