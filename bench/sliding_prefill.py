"""Gemma-3's sliding layers in prefill: transformers' SDPA over the whole prompt under a mask against
popserve's windowed attention (models/attention.py), the same POP runner, runs interleaved, medians.

    python bench/sliding_prefill.py [--lengths 1024,2048,4000] [--repeats 3] [--threads 2] [--dtype auto]

Prints each prompt length's prefill time both ways, the ratio, and the largest difference between
the two KV handoffs (summation order only: about 1e-5 in float32).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bench_checkpoint, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Gemma-3 checkpoint (default: the bench one, built if missing)")
    ap.add_argument("--lengths", default="1024,2048,4000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="bench/results/sliding-prefill.md")
    args = ap.parse_args()

    from popserve.models import attention
    from popserve.models.prefill import PrefillRequest, PrunedPrefill

    torch.set_num_threads(args.threads)
    runner = PrunedPrefill(bench_checkpoint("gemma3", args.model), 1 / 3, dtype=args.dtype)
    fam, config = runner.family, runner.text.config
    windows = sorted({fam.sliding_window(t) for t in fam.layer_types} - {None})
    kinds = {"whole prompt (transformers' sdpa)": "sdpa", "windowed": attention.NAME}
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        prompt = PrefillRequest(torch.randint(10, 2000, (n,), generator=torch.Generator().manual_seed(n)))
        times: dict[str, list[float]] = {k: [] for k in kinds}
        kv = {}
        for _ in range(args.repeats):
            for label, impl in kinds.items():
                config._attn_implementation = impl
                t0 = time.perf_counter()
                kv[label] = runner.prefill([prompt])[0].kv.float()
                times[label].append(time.perf_counter() - t0)
        whole, windowed = (statistics.median(times[k]) * 1e3 for k in kinds)
        diff = (kv[next(iter(kinds))] - kv["windowed"]).abs().max().item()
        rows.append(f"| {n} | {whole:.0f} ms | {windowed:.0f} ms | {whole / windowed:.2f}x | {diff:.1e} |")
    write_report(args.out, "\n".join([
        f"Gemma-3 POP prefill (k = L/3), {runner.k} of {fam.num_layers} layers skipped, sliding window "
        f"{windows}, {fam.layer_types.count('sliding_attention')} sliding layers, {runner.dtype}, "
        f"{args.threads} threads, medians of {args.repeats}, runs interleaved",
        "", "| prompt tokens | whole prompt | windowed | ratio | max KV difference |", "|---:|---:|---:|---:|---:|",
        *rows]))


if __name__ == "__main__":
    main()
