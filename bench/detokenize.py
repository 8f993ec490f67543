"""The Ingress's detokenizer against decoding the whole answer per token, side by side.

    python bench/detokenize.py [--family qwen3-vl] [--lengths 32,512,2048,8192] [--out bench/results/detokenize.md]

What one streamed answer costs the Ingress in detokenization, per token, for answers of each
length: popserve's Detokenizer (a short window per token) against the way it worked before,
and the way a plain loop does it, decoding the whole answer so far at every token. Runs
interleaved, medians of 5; the texts are checked equal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bench_checkpoint, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from popserve.models.prompt import PromptBuilder
    from popserve.service.engine.detokenize import Detokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--model", help="a checkpoint directory or hub id (default: the family's bench checkpoint)")
    ap.add_argument("--lengths", default="32,512,2048,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/detokenize.md")
    args = ap.parse_args(argv)

    tokenizer = PromptBuilder(bench_checkpoint(args.family, args.model)).tokenizer
    prose = ("The image shows a red circle to the left of a blue square; über the square, 漢字 and "
             "a small 🙂 are written in black. ")
    lengths = [int(n) for n in args.lengths.split(",")]
    ids_all = tokenizer.encode(prose * (max(lengths) // 20 + 1), add_special_tokens=False)

    def windowed(ids):
        detok = Detokenizer(tokenizer, ["</answer>"])
        return "".join(detok.feed(i) for i in ids) + detok.flush()

    def whole(ids):  # decode everything so far at every token, emit what is new
        text = ""
        for k in range(1, len(ids) + 1):
            new = tokenizer.decode(ids[:k], skip_special_tokens=True)
            if not new.endswith("\ufffd"):
                text = new
        return text

    rows = []
    for n in lengths:
        ids = ids_all[:n]
        assert windowed(ids) == whole(ids) == tokenizer.decode(ids), n
        times = {"windowed": [], "whole": []}
        for rep in range(args.repeats):
            for name, fn in (("windowed", windowed), ("whole", whole))[:: 1 if rep % 2 else -1]:
                t0 = time.perf_counter()
                fn(ids)
                times[name].append((time.perf_counter() - t0) / n)
        w, f = statistics.median(times["windowed"]), statistics.median(times["whole"])
        rows.append((n, w, f))
        print(f"{n:6d} tokens: Detokenizer {w * 1e3:.3f} ms/token, whole decode {f * 1e3:.3f} ms/token, "
              f"{f / w:.1f}x", flush=True)

    table = ("| answer tokens | Detokenizer (ms per token) | whole decode per token (ms per token) | ratio |\n"
             "|---:|---:|---:|---:|\n"
             + "\n".join(f"| {n} | {w * 1e3:.3f} | {f * 1e3:.3f} | {f / w:.1f}x |" for n, w, f in rows))
    header = (f"{args.model or args.family + ' bench'} tokenizer ({len(tokenizer)} tokens), one stop string, "
              f"median of {args.repeats} interleaved runs; equal texts checked\n\n")
    write_report(args.out, header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
