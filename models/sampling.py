"""Token sampling for a batch of sequences, each with its own parameters and seed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# Sampling parameters a checkpoint's generation_config.json may set too (vLLM's list, less
# max_new_tokens): the server's defaults for requests that leave them unset.
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drops tokens less likely than min_p x the likeliest one (after temperature)
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # OpenAI's: subtracted from a token's logit once it was generated (presence) and per time
    # (frequency), so that answers repeat themselves less; the prompt's tokens are not counted.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # transformers' and vLLM's: a token already in the prompt or the answer has its logit divided
    # by this when positive, multiplied when negative (> 1 repeats less).
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None  # None: off; N: the chosen token's log-probability and the N likeliest
    # vLLM's, which benchmark tools send for answers of a fixed length: no stop token (end of turn,
    # or stop_token_ids) before min_tokens; ignore_eos: only stop_token_ids end the answer.
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError("min_tokens must be in [0, max_new_tokens]")

    @property
    def penalises(self) -> bool:
        """Whether the tokens seen so far change the logits (a TokenHistory is needed)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def adjusts_logits(self) -> bool:
        return self.penalises or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> Optional[torch.Generator]:
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()  # non-deterministic, and only this generator's (torch.seed() reseeds the global RNG)
        return g


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the chosen token
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), likeliest first


class TokenHistory:
    """A sequence's tokens as the penalties need them, on the logits' device and kept step by step,
    so that a step touches only their logits: the distinct tokens of the prompt (when given, for
    repetition_penalty) and of the answer, and how often the answer holds each (0 for a token of the
    prompt only; presence / frequency penalties). Buffers are sized once for `max_new` answer
    tokens: a step adds in place, with nothing rebuilt from the answer."""

    def __init__(self, prompt_ids: Optional[torch.Tensor], max_new: int, device):
        prompt = [] if prompt_ids is None else prompt_ids.unique().tolist()
        self._index = {token: i for i, token in enumerate(prompt)}
        self._ids = torch.zeros(len(prompt) + max_new, dtype=torch.long, device=device)
        self._ids[:len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self._counts = torch.zeros(len(prompt) + max_new, device=device)

    def add(self, token: int) -> None:
        i = self._index.get(token)
        if i is None:
            i = self._index[token] = len(self._index)
            self._ids[i] = token
        self._counts[i] += 1

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[:len(self._index)]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[:len(self._index)]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           generated: Optional[list[list[int]]] = None,
           stop_ids: Optional[list[frozenset]] = None,
           history: Optional[list[Optional[TokenHistory]]] = None) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
    """logits [B, V] (float32) -> one token id per row, and per row its log-probabilities when
    asked for. `generated`: each row's tokens so far (their number counts for min_tokens);
    `stop_ids`: each row's stop tokens, held back until min_tokens; `history`: each row's
    TokenHistory, for the penalties (needed only by the rows that ask for one).

    After the logit changes, vLLM's order: temperature, min_p, top-k, top-p. Log-probabilities
    are the model's own distribution (log-softmax of its logits, before bias, penalties,
    temperature, top-k and top-p), as vLLM returns them by default."""
    want = [row for row, p in enumerate(params) if p.logprobs is not None]
    logp = torch.log_softmax(logits[want].float(), -1) if want else None  # stays on the device
    logits = adjust_logits(logits, params, generated or [[] for _ in params], stop_ids, history)
    greedy = [row for row, p in enumerate(params) if p.greedy]
    out = [0] * len(params)
    if greedy:  # the argmax of the rows that ask for it only: a row of 152k logits takes ~0.1 ms
        picked = logits if len(greedy) == len(params) else logits[greedy]
        for row, token in zip(greedy, picked.argmax(-1).tolist()):
            out[row] = token
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            out[row] = _draw(logits[row].float(), p, gen)
    logprobs: list[Optional[TokenLogprobs]] = [None] * len(params)
    if want:  # the k likeliest of every asking row at once; only those cross to the host
        values, ids = torch.topk(logp, max(params[row].logprobs for row in want), dim=-1)
        chosen = logp.gather(1, torch.tensor([[out[row]] for row in want], device=logp.device))
        values, ids, chosen = values.tolist(), ids.tolist(), chosen.flatten().tolist()
        for i, row in enumerate(want):
            k = params[row].logprobs
            logprobs[row] = TokenLogprobs(chosen[i], tuple(zip(ids[i][:k], values[i][:k])))
    return out, logprobs


def _draw(x: torch.Tensor, p: SamplingParams, gen: Optional[torch.Generator]) -> int:
    """One token from one row's logits [V], on their device, without sorting the vocabulary where
    it can be helped: real Qwen3-VL's defaults (top_k 20, top_p 0.8) sorted 152k logits per row
    and step, 8 ms of a decode step on the CPU. The draw is one uniform number from the request's
    generator (on the CPU, so that a seed gives the same answer alone or in any batch) against the
    candidates' cumulative probabilities."""
    x = x / p.temperature
    if p.min_p:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    ids = None  # the candidates' token ids, likeliest first; None: every token, in id order
    if p.top_k and p.top_k < x.numel():
        top, ids = torch.topk(x, p.top_k)
        # Tokens tied with the k-th stay, as in transformers and vLLM (bf16 logits tie often); a
        # k-th of -inf (fewer tokens left than k) has no ties worth keeping. One wait for the device.
        kth = torch.where(torch.isfinite(top[-1]), top[-1], float("inf"))  # a scalar, not a row
        tied = int((x >= kth).sum())
        x, ids = (top, ids) if tied <= p.top_k else torch.topk(x, tied)
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:  # the smallest prefix of the candidates, likeliest first, that reaches top_p
        if ids is None:
            probs, ids = _likeliest(probs, p.top_p)
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs >= p.top_p, 0.0)
    cum = probs.cumsum(-1)
    u = torch.rand(1, generator=gen).to(cum.device) * cum[-1]
    pick = torch.searchsorted(cum, u, right=True).clamp_(max=cum.numel() - 1)
    # One wait for the device: the token and the total together (ids are exact in float64).
    token, total = torch.cat(((pick if ids is None else ids[pick]).double(), cum[-1:].double())).tolist()
    if not total > 0 or total == float("inf"):  # NaN or inf logits (a temperature near 0): no distribution
        raise ValueError(f"cannot sample: the probabilities sum to {total} (temperature {p.temperature})")
    return int(token)


def _likeliest(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest tokens (probabilities and ids, likeliest first), enough of them to hold `mass`
    of the probability: top-k with a growing k, so that a peaked distribution costs no sort of
    the whole vocabulary."""
    k = 64
    while True:
        top, ids = torch.topk(probs, min(k, probs.numel()))
        if k >= probs.numel() or float(top.cumsum(-1)[-1]) >= mass:  # the sum the caller's mask uses
            return top, ids
        k *= 8


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], generated: list[list[int]],
                  stop_ids: Optional[list[frozenset]] = None,
                  history: Optional[list[Optional[TokenHistory]]] = None) -> torch.Tensor:
    """Logit bias, the penalties and min_tokens, on a copy, for the rows that ask."""
    stop_ids = stop_ids or [frozenset()] * len(params)
    early = [len(generated[row]) < p.min_tokens and bool(stop_ids[row]) for row, p in enumerate(params)]
    rows = [row for row, p in enumerate(params) if p.adjusts_logits or early[row]]
    if not rows:
        return logits
    logits = logits.clone()
    for row in rows:
        p, x = params[row], logits[row]
        if early[row]:
            x[sorted(stop_ids[row])] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=x.device)
            x.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=x.dtype, device=x.device))
        if p.penalises:
            if history is None or history[row] is None:
                raise ValueError("penalties need the sequence's tokens so far (TokenHistory)")
            ids, counts = history[row].ids, history[row].counts
            if p.repetition_penalty != 1.0:  # after the bias, before presence / frequency: vLLM's order
                was = x[ids]
                x[ids] = torch.where(was > 0, was / p.repetition_penalty, was * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:  # the answer's tokens: counts > 0
                x[ids] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits
