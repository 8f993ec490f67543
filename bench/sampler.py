"""The sampler against the one it replaced (a full-vocabulary sort per row for top-p, multinomial
over the whole vocabulary), side by side on the same logits, one thread, medians.

    python bench/sampler.py [--out bench/results/sampler.md]

Vocabularies: the bench checkpoint's (6144), Qwen3-VL's (151936) and Gemma-3's (262208); the
parameters real checkpoints ask for by default (generation_config.json) and two plain ones;
"peaked" logits (a few likely tokens, as a language model's usually are) and "flat" ones.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import write_report  # noqa: E402

from popserve.models.sampling import SamplingParams, sample  # noqa: E402

PARAMS = {"qwen3-vl defaults (T 0.7, top_k 20, top_p 0.8)": dict(temperature=0.7, top_k=20, top_p=0.8),
          "gemma-3 defaults (top_k 64, top_p 0.95)": dict(temperature=1.0, top_k=64, top_p=0.95),
          "T 1": dict(temperature=1.0),
          "top_p 0.9 alone": dict(temperature=1.0, top_p=0.9)}


def full_sort_sampler(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """What popserve sampled with before: per row, masks over the whole vocabulary, a sort of all
    of it for top-p, and torch.multinomial over all of it."""
    out = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        x = logits[row].float().cpu() / p.temperature
        if p.top_k:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, -1) >= p.top_p
            x = x.scatter(0, idx[drop], float("-inf"))
        out.append(int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen).item()))
    return out


def logits_for(kind: str, batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, vocab, generator=g) * 3
    if kind == "peaked":
        x[:, torch.randint(0, vocab, (5,), generator=g)] += 20.0  # >99% of the probability
    return x


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", default="6144,151936,262208")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="bench/results/sampler.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for vocab in map(int, args.vocab.split(",")):
        for kind in ("peaked", "flat"):
            logits = logits_for(kind, args.batch, vocab)
            for name, kw in PARAMS.items():
                params = [SamplingParams(seed=i, **kw) for i in range(args.batch)]
                ours, before = [p.generator() for p in params], [p.generator() for p in params]
                t_ours = median_ms(lambda: sample(logits, params, ours), args.repeats)
                t_before = median_ms(lambda: full_sort_sampler(logits, params, before), args.repeats)
                rows.append((vocab, kind, name, t_before, t_ours))
                print(f"vocab {vocab:6d} {kind:6s} {name:46s} before {t_before:8.2f} ms  now {t_ours:7.2f} ms  "
                      f"{t_before / t_ours:5.1f}x", flush=True)
    table = [f"One thread, batch {args.batch}, medians of {args.repeats}; "
             "the time of one `sample()` call for the whole batch.",
             "", "| vocabulary | logits | parameters | before (full sort, multinomial) | now | ratio |",
             "|---:|---|---|---:|---:|---:|"]
    table += [f"| {v} | {k} | {n} | {b:.2f} ms | {o:.2f} ms | {b / o:.1f}x |" for v, k, n, b, o in rows]
    write_report(args.out, "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
