"""The decoder's and prefill's CPU weight layouts side by side: oneDNN-prepacked Linears (what
`models.loading.fast_cpu_linears` picks for bf16 on CPUs that compute it natively) against the
unpacked layout it would use otherwise. Runs interleaved, medians, ratios printed.

    python bench/cpu_layouts.py                      # the bench Qwen3-VL, bf16, decode 1 thread, prefill 2
    python bench/cpu_layouts.py --model DIR --batches 1,8,16 --lengths 512,2048

Outputs are bit-identical between the two (tests/test_models_handoff.py); only the time differs.
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
from engine import checkpoint, model_arguments, what_model  # noqa: E402
from loadgen import write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(model, args, packed: bool):
    """(prefill, decoder) with the packed layout, or with packing turned off while they load."""
    from popserve.models import loading
    from popserve.models.decoder import FullDecoder
    from popserve.models.prefill import PrunedPrefill

    can_pack = loading._can_pack
    if not packed:
        loading._can_pack = lambda dtype: False
    try:
        return (PrunedPrefill(model, args.ratio, args.dtype, "cpu"),
                FullDecoder(model, args.ratio, args.dtype, "cpu", max_seqs=max(args.batches),
                            max_seq_len=max(args.lengths) + args.repeats * 4 + 16))
    finally:
        loading._can_pack = can_pack


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each fn, the arms alternating call by call after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    from popserve.models import loading
    from popserve.models.prefill import PrefillRequest
    from popserve.models.sampling import SamplingParams

    ap = model_arguments(argparse.ArgumentParser())
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="226,2048", help="prompt tokens (prefill; decode context)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--decode-threads", type=int, default=1, help="the decode replica's default")
    ap.add_argument("--prefill-threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cpu-layouts.md")
    args = ap.parse_args(argv)
    args.device = "cpu"
    args.batches = [int(x) for x in args.batches.split(",")]
    args.lengths = [int(x) for x in args.lengths.split(",")]
    model, _ = checkpoint(args)
    packed = build(model, args, True)
    dtype = packed[1].dtype
    if not loading._can_pack(dtype):
        print(f"no packed layout for {dtype} on this CPU (try --dtype bfloat16): nothing to compare")
        return 0
    arms = {"packed": packed, "unpacked": build(model, args, False)}
    rows = ["| what | packed (ms) | unpacked (ms) | unpacked / packed |", "|---|---:|---:|---:|"]

    def row(name, t):
        rows.append(f"| {name} | {t['packed'] * 1e3:.1f} | {t['unpacked'] * 1e3:.1f} | "
                    f"{t['unpacked'] / t['packed']:.2f}x |")
        print(rows[-1], flush=True)

    ids = {n: torch.randint(100, 1000, (n + 1,)) for n in args.lengths}
    torch.set_num_threads(args.prefill_threads)
    for n in args.lengths:
        reqs = [PrefillRequest(ids[n])]
        row(f"POP prefill, {n} tokens, {args.prefill_threads} threads",
            interleaved({k: (lambda p=p: p.prefill(reqs)) for k, (p, _) in arms.items()}, args.repeats))
    torch.set_num_threads(args.decode_threads)
    for n in args.lengths:
        handoffs = {k: p.prefill([PrefillRequest(ids[n])])[0] for k, (p, _) in arms.items()}
        for b in args.batches:
            for k, (_, dec) in arms.items():
                for _ in range(b):
                    dec.add(handoffs[k], SamplingParams(max_new_tokens=args.repeats * 4 + 8))
            row(f"decode step, batch {b}, context {n}, {args.decode_threads} thread(s)",
                interleaved({k: dec.step for k, (_, dec) in arms.items()}, args.repeats))
            for _, dec in arms.values():
                for seq in list(dec.running):
                    dec.remove(seq.seq_id)

    text = (f"CPU weight layouts, {what_model(args)}, {str(dtype).split('.')[-1]}, torch {torch.__version__}; "
            f"interleaved, median of {args.repeats}\n\n" + "\n".join(rows) + "\n")
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
