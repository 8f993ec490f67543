"""FullDecoder stage: the whole text model, continuous batching over a preallocated KV pool.

A sequence joins with a KV handoff. Its first step feeds t_N, the last prompt token, through all
L layers at cache index N-1 (POP's boundary handling): that is an ordinary decode step, so it runs
in the same batched loop as every other sequence's next token. Sequences leave when done.

KV memory: one preallocated pool per layer type [layers of the type, 2, max_seqs, kv_heads,
capacity, head_dim], each as long as its attention reaches: max_seq_len, or for Gemma-3's sliding
layers their window, whose keys they keep in a ring (cache index i in entry i mod window), so that
those layers hold and read a window's keys however long the sequence. Running sequences occupy
slots 0..n-1 (a leaving sequence's slot is refilled by the last one), so each layer's attention
reads a strided view of its pool: no gather, no copy, one SDPA call per layer.

On a GPU an eager step is launch-bound (2,158 kernels per step of the 8B shape on an H200: 72-130 ms,
the GPU busy 8-11% of it), so the step is replayed from CUDA graphs (9-11 ms: docs/performance.md),
one per (batch, width) bucket, captured once on the empty pool. A step pads its batch with idle slots and its width with
masked keys up to the next bucket; inputs go through static buffers the graphs read.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .decode_layer import DecodeLayer
from .families.base import get_module
from .kv import KVHandoff, pop_fingerprint
from .loading import fast_cpu_linears, load_checkpoint, param_bytes, release
from .masks import decode_masks
from .pop import skipped_layer_count
from .sampling import SamplingParams, TokenHistory, TokenLogprobs, sample

log = logging.getLogger(__name__)


class DecoderFull(RuntimeError):
    """No free slot or KV memory for another sequence (admission control)."""


@dataclass
class Sequence:
    seq_id: int
    params: SamplingParams
    length: int  # KV entries filled in the slot
    next_token: int
    rope_delta: int
    prompt_tokens: int
    generator: Optional[torch.Generator]
    stop_ids: frozenset
    history: Optional[TokenHistory] = None  # kept for the penalties only
    generated: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    seq_id: int
    token: int
    finish_reason: Optional[str]  # None while running; "stop" or "length" when done
    logprobs: Optional[TokenLogprobs] = None  # when the sequence's params ask for them


class _SlotCache:
    """The decode step's KV store: writes each sequence's new K/V at its own cache index (modulo
    its layer type's capacity) and returns views of the type's pool up to the step's width, or the
    capacity where that is less (the transformers Cache interface)."""

    def __init__(self, pools: dict[str, torch.Tensor], layer_types: list[str]):
        self.pools = pools
        self.of_layer = [(t, layer_types[:i].count(t)) for i, t in enumerate(layer_types)]  # (type, index in its pool)
        self.rows = None
        self.index: dict[str, torch.Tensor] = {}
        self.width: dict[str, int] = {}

    def set_step(self, rows: torch.Tensor, index: torch.Tensor, width: int) -> None:
        self.rows = rows
        for t, pool in self.pools.items():
            capacity = pool.shape[4]
            self.index[t] = index % capacity if capacity < width else index  # a ring once it can wrap
            self.width[t] = min(width, capacity)

    def update(self, k, v, layer_idx, *args, **kwargs):
        t, j = self.of_layer[layer_idx]
        pool, index, width, n = self.pools[t], self.index[t], self.width[t], k.shape[0]
        pool[j, 0, self.rows, :, index] = k[:, :, 0]
        pool[j, 1, self.rows, :, index] = v[:, :, 0]
        return pool[j, 0, :n, :, :width], pool[j, 1, :n, :, :width]


class FullDecoder:
    def __init__(self, model: str | Path, pop_ratio: float = 1 / 3, dtype: str = "auto", device: str = "cpu",
                 max_seqs: int = 16, max_seq_len: int = 4096, cuda_graphs: bool = True):
        loaded = load_checkpoint(model, dtype, device)
        fam = self.family = loaded.family
        self.device, self.dtype = loaded.device, loaded.dtype
        k = skipped_layer_count(fam.num_layers, pop_ratio, first_kept=fam.num_deepstack)
        # Accept handoffs of this model from POP at the configured ratio, or full prefill (A/B off).
        self.accepted = {pop_fingerprint(loaded.fingerprint, k): k, pop_fingerprint(loaded.fingerprint, 0): 0}
        self.text = get_module(loaded.model, fam.text_path).to(self.device)
        self.lm_head = loaded.model.lm_head.to(self.device)
        release(loaded)
        # Steps run lean layers on the text model's own modules (models/decode_layer.py); each
        # transformers layer goes as soon as its DecodeLayer holds the fused copies it needs.
        self.layers = nn.ModuleList()
        for i, layer in enumerate(self.text.layers):
            self.layers.append(DecodeLayer(layer, fam))
            self.text.layers[i] = nn.Identity()
        self.text.layers = None
        if self.device.type == "cpu":
            self.layers, self.text, self.lm_head = fast_cpu_linears(self.layers, self.text, self.lm_head)
        self.max_seqs, self.max_seq_len = max_seqs, max_seq_len
        # One pool per layer type, as long as its attention reaches (module docstring).
        self.capacity = {t: min(fam.sliding_window(t) or max_seq_len, max_seq_len) for t in dict.fromkeys(fam.layer_types)}
        self.layers_of = {t: [i for i, u in enumerate(fam.layer_types) if u == t] for t in self.capacity}
        self.pools = {t: torch.zeros(len(self.layers_of[t]), 2, max_seqs, fam.num_kv_heads, cap, fam.head_dim,
                                     dtype=self.dtype, device=self.device) for t, cap in self.capacity.items()}
        self._cache = _SlotCache(self.pools, fam.layer_types)
        # Each step's inputs (next token, cache index, rope delta per slot), where graphs read them.
        self._inputs = torch.zeros(3, max_seqs, dtype=torch.long, device=self.device)
        self._rows = torch.arange(max_seqs, device=self.device)
        self.running: list[Sequence] = []  # index in this list == slot
        self._ids = itertools.count()
        # The padded shapes a graph step may take (fixed by the limits, so derived once, not per step).
        self.batch_buckets, self.width_buckets = batch_buckets(max_seqs), width_buckets(max_seq_len)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (batch, width) bucket -> (CUDAGraph, logits)
        if cuda_graphs and self.device.type == "cuda":
            self._capture_graphs()

    # ---- bookkeeping -----------------------------------------------------------------------
    def param_bytes(self) -> int:
        return param_bytes(self.layers, self.text, self.lm_head)

    @property
    def kv_pool_bytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in self.pools.values())

    @property
    def kv_bytes_in_use(self) -> int:
        """The bytes of the pools' entries that running sequences fill."""
        fam = self.family
        per_entry = 2 * fam.num_kv_heads * fam.head_dim * self.dtype.itemsize
        return sum(len(self.layers_of[t]) * min(s.length, cap) * per_entry
                   for s in self.running for t, cap in self.capacity.items())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def check(self, handoff: KVHandoff) -> None:
        """Raise HandoffMismatch unless this decoder can consume the handoff."""
        fam = self.family
        handoff.check(self.accepted, fam.layer_types, fam.layer_windows, fam.num_kv_heads, fam.head_dim, self.dtype)

    def can_admit(self, handoff_tokens: int, max_new_tokens: int, count: int = 1) -> bool:
        """Whether `count` sequences of this size fit now (n > 1 choices share one handoff)."""
        return len(self.running) + count <= self.max_seqs and handoff_tokens + 1 + max_new_tokens <= self.max_seq_len

    # ---- sequences -------------------------------------------------------------------------
    def add(self, handoff: KVHandoff, params: SamplingParams, stop_token_ids=()) -> int:
        self.check(handoff)
        n = handoff.num_tokens
        if n + 1 + params.max_new_tokens > self.max_seq_len:
            raise DecoderFull(f"prompt ({n + 1}) + max_new_tokens ({params.max_new_tokens}) exceeds "
                              f"max_seq_len {self.max_seq_len}")
        if len(self.running) >= self.max_seqs:
            raise DecoderFull(f"all {self.max_seqs} sequence slots are busy")
        slot = len(self.running)
        self._store(slot, handoff)
        ends = frozenset(() if params.ignore_eos else stop_token_ids) | frozenset(params.stop_token_ids)
        history = None
        if params.penalises:
            if params.repetition_penalty != 1.0 and handoff.prompt_ids is None:
                raise ValueError("repetition_penalty needs the prompt's token ids, and this handoff has none")
            prompt = handoff.prompt_ids if params.repetition_penalty != 1.0 else None  # only it counts them
            history = TokenHistory(prompt, params.max_new_tokens, self.device)
        seq = Sequence(next(self._ids), params, n, handoff.last_token, handoff.rope_delta, n + 1,
                       params.generator(), ends, history)
        self.running.append(seq)
        return seq.seq_id

    def remove(self, seq_id: int) -> bool:
        """Drop a sequence (finished or aborted) and compact the slots."""
        for slot, seq in enumerate(self.running):
            if seq.seq_id == seq_id:
                last = len(self.running) - 1
                if slot != last:
                    moved = self.running[last]
                    for t, pool in self.pools.items():  # a ring moves whole: its entries keep their places
                        filled = min(moved.length, self.capacity[t])
                        pool[:, :, slot, :, :filled] = pool[:, :, last, :, :filled]
                    self.running[slot] = moved
                self.running.pop()
                return True
        return False

    def _store(self, slot: int, handoff: KVHandoff) -> None:
        """A handoff's KV into `slot` of each layer type's pool, a type in one copy (two where a
        ring wraps): a ring keeps the last `capacity` cache indices, index i in entry i mod capacity."""
        n = handoff.num_tokens
        for (layers, _), kv in zip(handoff.groups, handoff.blocks(self.device)):
            t = self.family.layer_types[layers[0]]  # check(): a group is one type's layers, in its pool's order
            pool, cap = self.pools[t], self.capacity[t]
            # check() and add() leave the group exactly what the pool keeps: its last min(n, cap) indices
            start = n % cap if n > cap else 0  # the ring entry of the oldest index kept
            head = kv[:, :, :, :cap - start]
            pool[:, :, slot, :, start:start + head.shape[3]] = head
            if start:
                pool[:, :, slot, :, :start] = kv[:, :, :, cap - start:]

    # ---- the step --------------------------------------------------------------------------
    def _forward(self, batch: int, width: int) -> torch.Tensor:
        """Logits [batch, V] for the first `batch` slots' inputs, attending to keys 0..width-1.
        Shapes depend on (batch, width) alone, so a CUDA graph of this call replays any step."""
        fam, text = self.family, self.text
        tokens, index, deltas = self._inputs[0, :batch, None], self._inputs[1, :batch], self._inputs[2, :batch]
        hidden = fam.embed(text, tokens)
        pe = fam.rotary(text, hidden, fam.decode_positions(index, deltas))
        masks = decode_masks(fam, index, width, self.capacity)
        self._cache.set_step(self._rows[:batch], index, width)
        for i, layer in enumerate(self.layers):
            t = fam.layer_types[i]
            hidden = layer(hidden, *pe[t], masks[t], self._cache, i)
        return self.lm_head(text.norm(hidden[:, -1])).float()

    def bucket(self, batch: int, width: int) -> tuple[int, int]:
        """The smallest captured (batch, width) that holds this step."""
        return (min(b for b in self.batch_buckets if b >= batch), min(w for w in self.width_buckets if w >= width))

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """Capture every bucket's step on the empty pool (largest first, so that the smaller ones
        reuse its memory in the shared pool). Capture writes nothing: recorded kernels only run at
        replay. If capture fails, steps stay eager and the server still serves."""
        batches, widths = self.batch_buckets, self.width_buckets
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the graph: cuBLAS handles, lazy inits
                self._forward(batches[-1], widths[-1])
            torch.cuda.current_stream().wait_stream(side)
            mempool = torch.cuda.graph_pool_handle()
            for b in reversed(batches):
                for w in reversed(widths):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=mempool):
                        logits = self._forward(b, w)
                    self.graphs[b, w] = (graph, logits)
        except RuntimeError as exc:
            log.warning("decode steps stay eager: CUDA graph capture failed: %s", exc)
            self.graphs = {}
        for pool in self.pools.values():  # the warm-up wrote K/V at index 0 of the first slots
            pool.zero_()

    @torch.inference_mode()
    def next_logits(self, mode: str = "auto") -> torch.Tensor:
        """Logits [n, V] of every running sequence's next token; the step's only state change is
        its K/V write at each sequence's cache index, which the step will write again.
        mode "auto": replayed from the bucket's CUDA graph when there are graphs, else eagerly at the
        step's own shape ("exact"); "padded": eagerly at the bucket's shape, what a graph computes."""
        if mode not in ("auto", "exact", "padded"):
            raise ValueError(f"mode must be auto, exact or padded, not {mode!r}")
        seqs, n = self.running, len(self.running)
        width = max(s.length for s in seqs) + 1
        graph = mode == "auto" and bool(self.graphs)
        batch, width = self.bucket(n, width) if graph or mode == "padded" else (n, width)
        # Padding rows are idle slots: they decode token 0 at index 0, and their output is dropped.
        host = torch.zeros(3, batch, dtype=torch.long)
        host[:, :n] = torch.tensor([[s.next_token, s.length, s.rope_delta] for s in seqs]).T
        self._inputs[:, :batch].copy_(host)
        if graph:
            replay, logits = self.graphs[batch, width]
            replay.replay()
        else:
            logits = self._forward(batch, width)
        return logits[:n]

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One token for every running sequence (the first one of a new sequence is its boundary
        step on t_N). Finished sequences are removed before returning."""
        if not self.running:
            return []
        seqs = self.running
        chosen, logprobs = sample(self.next_logits(), [s.params for s in seqs], [s.generator for s in seqs],
                                  [s.generated for s in seqs], [s.stop_ids for s in seqs],
                                  [s.history for s in seqs])

        outputs, done = [], []
        for seq, tok, lp in zip(seqs, chosen, logprobs):
            seq.length += 1
            seq.generated.append(tok)
            if seq.history is not None:
                seq.history.add(tok)
            seq.next_token = tok
            reason = None
            if tok in seq.stop_ids:
                reason = "stop"
            elif len(seq.generated) >= seq.params.max_new_tokens:
                reason = "length"
            outputs.append(StepOutput(seq.seq_id, tok, reason, lp))
            if reason:
                done.append(seq.seq_id)
        for seq_id in done:
            self.remove(seq_id)
        return outputs

    def generate(self, handoffs: list[KVHandoff], params: SamplingParams | list[SamplingParams],
                 stop_token_ids=()) -> list[list[int]]:
        """Convenience for tests and tools: decode these handoffs together to completion."""
        plist = params if isinstance(params, list) else [params] * len(handoffs)
        ids = [self.add(h, p, stop_token_ids) for h, p in zip(handoffs, plist)]
        result: dict[int, list[int]] = {i: [] for i in ids}
        while any(s.seq_id in result for s in self.running):
            for out in self.step():
                if out.seq_id in result:
                    result[out.seq_id].append(out.token)
        return [result[i] for i in ids]


def batch_buckets(max_seqs: int) -> list[int]:
    """Batch sizes decode graphs are captured for: powers of two, and max_seqs."""
    return sorted({min(2**i, max_seqs) for i in range(max_seqs.bit_length() + 1)})


def width_buckets(max_seq_len: int, first: int = 256) -> list[int]:
    """Attention widths decode graphs are captured for: 256, 384, 512, 768, ... (at most 1.5x the
    width a step needs, so at most a third of its attention reads are masked), and max_seq_len."""
    out, w = [], first
    while w < max_seq_len:
        out += [w, w * 3 // 2]
        w *= 2
    return sorted({min(x, max_seq_len) for x in out} | {max_seq_len})
