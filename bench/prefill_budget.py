"""Prefill batches limited by tokens: TTFT under a burst of long prompts, two budgets, one run.

    python bench/prefill_budget.py [--clients 8] [--text-tokens 2048] [--budgets 32768,4096]

Starts popserve on the bench checkpoint once per budget (`prefill_batch_tokens`) and sends the
same burst: `--clients` unique prompts at once. 32768 lets the whole burst into one batch, as the
old limit of 8 prompts per batch did; 4096 is the default. Writes bench/results/prefill_budget.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bench_checkpoint, chat_body, run_load, text_prompt, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from popserve.service import launcher
    from popserve.service.config import ServeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--budgets", default="32768,4096")
    ap.add_argument("--port", type=int, default=8125)
    ap.add_argument("--out", default="bench/results/prefill_budget.md")
    args = ap.parse_args(argv)

    model = bench_checkpoint(args.family)
    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for budget in map(int, args.budgets.split(",")):
        cfg = ServeConfig.model_validate({"model": model, "port": args.port, "prefill_batch_tokens": budget,
                                          "engine": {"max_running_seqs": 16, "max_seq_len": 4096}}).resolved()
        launcher.start(cfg)
        try:
            url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
            name = cfg.model_name()
            asyncio.run(run_load(url, [chat_body(name, text_prompt(tok, 64, -1), None, 4)] * 2, 1))  # warm-up
            # The same prompts for every budget (seeds by index), unique within the burst.
            bodies = [chat_body(name, text_prompt(tok, args.text_tokens, 1000 + j), None, args.max_tokens)
                      for j in range(args.clients)]
            r = asyncio.run(run_load(url, bodies, args.clients))
        finally:
            launcher.stop()
        rows.append((budget, r))
        print(f"budget {budget:6d}: ok {r['ok']}/{r['requests']}  TTFT p50 {r['ttft_p50']:.1f} s  "
              f"p90 {r['ttft_p90']:.1f} s  mean {r['ttft_mean']:.1f} s  E2E p50 {r['e2e_p50']:.1f} s  "
              f"{r['out_tok_s']:.2f} tok/s", flush=True)

    base = rows[0][1]
    lines = [f"bench checkpoint {args.family} (24 layers x 512), {args.clients} clients at once, "
             f"{args.text_tokens}-token prompts, {args.max_tokens} output tokens, POP on", "",
             "| prefill_batch_tokens | TTFT p50 (s) | TTFT p90 (s) | TTFT mean (s) | E2E p50 (s) | out tok/s | TTFT p50 vs first row |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for budget, r in rows:
        lines.append(f"| {budget} | {r['ttft_p50']:.1f} | {r['ttft_p90']:.1f} | {r['ttft_mean']:.1f} | "
                     f"{r['e2e_p50']:.1f} | {r['out_tok_s']:.2f} | {base['ttft_p50'] / r['ttft_p50']:.2f}x |")
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
