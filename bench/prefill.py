"""Full prefill vs POP prefill (k = L/3) on the bench checkpoints, runs interleaved, medians.

    python bench/prefill.py [--families qwen3-vl,gemma3] [--repeats 5] [--out bench/results/prefill.md]

Text prompts of 128 / 512 / 2048 tokens time the prefill runner alone; image prompts (one 448x448
or 896x896 image + a short question) time encoder + prefill, as a request sees them. Prints a table
of medians and the speedup ratio full / POP measured side by side in this run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bench_dir(family: str, root: Path) -> Path:
    from popserve.models.tiny import make_tiny

    d = root / f"bench-{family}"
    if not (d / "config.json").exists():
        make_tiny(family, "bench", d)
    return d


def _text_request(vocab_ids: list[int], n: int, seed: int):
    from popserve.models.prefill import PrefillRequest

    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(vocab_ids)[torch.randint(len(vocab_ids), (n + 1,), generator=g)]
    return PrefillRequest(ids)  # n tokens are prefilled, the last one is decode's


def main(argv=None) -> int:
    from PIL import Image

    from popserve.models.encoder import VisionEncoder
    from popserve.models.prefill import PrefillRequest, PrunedPrefill
    from popserve.models.prompt import PromptBuilder

    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="qwen3-vl,gemma3")
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--images", default="448,896")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=1 / 3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "popserve-bench"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="bench/results/prefill.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for family in args.families.split(","):
        d = _bench_dir(family, Path(args.cache))
        full, pop = PrunedPrefill(d, 0.0, args.dtype), PrunedPrefill(d, args.ratio, args.dtype)
        enc, builder = VisionEncoder(d, args.dtype), PromptBuilder(d)
        compute_dtype = str(full.dtype).split(".")[-1]
        special = set(builder.tokenizer.all_special_ids)
        vocab = [i for i in range(len(builder.tokenizer)) if i not in special]
        cases = [(f"text {n}", lambda n=n, s=0: ([_text_request(vocab, n, s)], None))
                 for n in map(int, args.lengths.split(","))]
        for side in map(int, args.images.split(",")):
            img = Image.effect_noise((side, side), 64).convert("RGB")
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
            prompt = builder.build(msgs, [img])
            cases.append((f"image {side}x{side}", lambda p=prompt: (p, True)))

        for name, make in cases:
            times = {"full": [], "pop": []}
            for rep in range(args.repeats + 1):  # first round warms up, not counted
                for label, runner in (("full", full), ("pop", pop)) if rep % 2 == 0 else (("pop", pop), ("full", full)):
                    payload, is_image = make()
                    t0 = time.perf_counter()
                    if is_image:
                        feats = enc.encode_pixels(payload.pixels)
                        runner.prefill([PrefillRequest(payload.input_ids, payload.mm_token_type_ids, feats)])
                        n_tok = payload.num_tokens - 1
                    else:
                        runner.prefill(payload)
                        n_tok = payload[0].input_ids.numel() - 1
                    if rep:
                        times[label].append(time.perf_counter() - t0)
            f, p = statistics.median(times["full"]), statistics.median(times["pop"])
            rows.append((family, name, n_tok, f, p, f / p))
            print(f"{family:9s} {name:14s} tokens={n_tok:5d} full={f*1000:8.1f} ms pop={p*1000:8.1f} ms "
                  f"speedup={f/p:.2f}x", flush=True)
        del full, pop, enc

    L = "| family | prompt | prefill tokens | full (ms) | POP k=L/3 (ms) | speedup |\n|---|---|---|---|---|---|\n"
    table = L + "\n".join(f"| {a} | {b} | {c} | {d*1000:.1f} | {e*1000:.1f} | {r:.2f}x |" for a, b, c, d, e, r in rows)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, bench checkpoints "
              f"(24 layers x 512, stored bf16, computed in {compute_dtype}), "
              f"median of {args.repeats} interleaved runs\n\n")
    write_report(args.out, header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
