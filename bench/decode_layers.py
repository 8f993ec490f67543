"""The decoder's lean DecodeLayers against the checkpoint's own transformers layers, side by side.

    python bench/decode_layers.py [--family qwen3-vl] [--batches 1,4,8,16] [--out bench/results/decode-layers.md]

Two FullDecoders on the bench checkpoint, identical except for the layers a step runs through
(models/decode_layer.py: DecodeLayer, or TransformersLayer around the checkpoint's layers, both
with the decoder's CPU weight layout). Same handoffs, steps interleaved, medians; the first
step's logits are compared too (they must be equal).
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


def main(argv=None) -> int:
    from popserve.models.decode_layer import transformers_layers
    from popserve.models.decoder import FullDecoder
    from popserve.models.prefill import PrefillRequest, PrunedPrefill
    from popserve.models.sampling import SamplingParams
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--model", help="checkpoint dir (default: the bench checkpoint, built if missing)")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--context", type=int, default=230, help="prompt tokens of every sequence")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per decoder and batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the decode replica's default: 1)")
    ap.add_argument("--out", default="bench/results/decode-layers.md")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = bench_checkpoint(args.family, args.model)
    handoff = PrunedPrefill(model, 1 / 3).prefill([PrefillRequest(torch.randint(100, 1000, (args.context,)))])[0]
    batches = [int(b) for b in args.batches.split(",")]
    decoders = {"transformers layers": FullDecoder(model, 1 / 3, max_seqs=max(batches), max_seq_len=1024),
                "DecodeLayer": FullDecoder(model, 1 / 3, max_seqs=max(batches), max_seq_len=1024)}
    ref = decoders["transformers layers"]
    ref.layers = transformers_layers(model, ref.family, ref.dtype, ref.device)

    lines = [f"{args.family} bench checkpoint, {ref.dtype}, {args.threads} thread(s), {args.context}-token contexts; "
             f"medians of {args.steps} interleaved steps", "",
             "| batch | transformers layers (ms) | DecodeLayer (ms) | speed-up | first step's logits equal |",
             "|---:|---:|---:|---:|---|"]
    for batch in batches:
        first = {}
        for name, dec in decoders.items():
            while dec.running:
                dec.remove(dec.running[0].seq_id)
            for _ in range(batch):
                dec.add(handoff, SamplingParams(max_new_tokens=args.steps + 8))
            seen = []
            hook = dec.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
            dec.step()
            hook.remove()
            first[name] = seen[0]
            for _ in range(2):
                dec.step()
        times = {name: [] for name in decoders}
        for _ in range(args.steps):
            for name, dec in decoders.items():
                start = time.perf_counter()
                dec.step()
                times[name].append(time.perf_counter() - start)
        old, new = (statistics.median(times[n]) * 1e3 for n in decoders)
        same = torch.equal(*first.values())
        lines.append(f"| {batch} | {old:.1f} | {new:.1f} | {old / new:.2f}x | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
