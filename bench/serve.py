"""Serving benchmark: POP on vs POP off through the whole disaggregated server, same run.

    python bench/serve.py [--family qwen3-vl] [--concurrency 1,4,16] [--requests 16] [--out bench/results/serve.md]

Starts popserve on the bench checkpoint (local Ray, loopback port), then for each workload
(2048-token text prompts; a 448x448 image + short question) and each concurrency runs the same
load with "pop": true and "pop": false, alternating which goes first. Prints TTFT / ITL / E2E /
output tok/s and the ratios off/on, and the share of TTFT spent in the KV handoff (from decode's stats).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bench_checkpoint, chat_body, noise_image_url, run_load, text_prompt, warm_up, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def decode_stats() -> dict:
    """The decode replica's own counters (handoffs, steps, tokens_out, ...): exact at once, where
    /metrics is a couple of seconds behind."""
    from ray import serve

    from popserve.service.launcher import APP_NAME

    return serve.get_deployment_handle("Decode", app_name=APP_NAME).stats.remote().result()


def handoffs() -> tuple[int, float]:
    """(KV handoffs, their summed seconds) so far."""
    stats = decode_stats()
    return stats["handoffs"], stats["handoff_seconds"]


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from popserve.service import launcher
    from popserve.service.config import ServeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--model", help="checkpoint dir (default: the bench checkpoint, built if missing)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per (workload, concurrency, pop)")
    ap.add_argument("--text-tokens", type=int, default=2048)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--config", help="YAML ServeConfig overrides")
    ap.add_argument("--out", default="bench/results/serve.md")
    args = ap.parse_args(argv)

    model = bench_checkpoint(args.family, args.model)
    base_cfg = ServeConfig.from_yaml(args.config).model_dump() if args.config else {}
    cfg = ServeConfig.model_validate({**base_cfg, "model": model, "port": args.port,
                                      "engine": {"max_running_seqs": 16, "max_seq_len": 4096}})
    launcher.start(cfg.resolved())
    base = f"http://127.0.0.1:{args.port}"
    url = f"{base}/v1/chat/completions"
    name = cfg.resolved().model_name()
    tok = AutoTokenizer.from_pretrained(model)
    rows, seed = [], 0
    try:
        for pop in (True, False):  # each prefill deployment, at each prompt shape
            warm_up(url, name, tok, [f"text{args.text_tokens}", f"image{args.image_side}"], {"pop": pop})
        for workload in ("text", "image"):
            for conc in map(int, args.concurrency.split(",")):
                n = max(args.requests, conc)
                res = {}
                order = [True, False] if len(rows) % 2 == 0 else [False, True]  # alternate who goes first
                for pop in order:
                    bodies = []
                    for _ in range(n):
                        seed += 1
                        if workload == "text":
                            bodies.append(chat_body(name, text_prompt(tok, args.text_tokens, seed), None,
                                                    args.max_tokens, {"pop": pop}))
                        else:
                            bodies.append(chat_body(name, "What is shown in this picture?",
                                                    noise_image_url(args.image_side, seed), args.max_tokens,
                                                    {"pop": pop}))
                    before = handoffs()
                    res[pop] = asyncio.run(run_load(url, bodies, conc))
                    handed, secs = (b - a for a, b in zip(before, handoffs()))
                    res[pop]["handoff_s"] = secs / max(1, handed)
                    r = res[pop]
                    print(f"{workload:5s} c={conc:2d} pop={'on ' if pop else 'off'} ok={r['ok']}/{r['requests']} "
                          f"TTFT p50={r['ttft_p50']*1000:7.1f} ms  ITL p50={r['itl_p50']*1000:6.1f} ms  "
                          f"E2E p50={r['e2e_p50']:6.2f} s  {r['out_tok_s']:6.1f} tok/s  "
                          f"handoff={r['handoff_s']*1000:6.1f} ms  errors={r['errors']}", flush=True)
                rows.append((workload, conc, res[True], res[False]))
    finally:
        launcher.stop()

    head = ("| workload | clients | TTFT p50 on / off (ms) | TTFT ratio off/on | ITL p50 on / off (ms) | "
            "E2E p50 on / off (s) | tok/s on / off | handoff / TTFT (on) |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for w, c, on, off in rows:
        lines.append(f"| {w} | {c} | {on['ttft_p50']*1000:.0f} / {off['ttft_p50']*1000:.0f} | "
                     f"{off['ttft_p50']/on['ttft_p50']:.2f}x | {on['itl_p50']*1000:.1f} / {off['itl_p50']*1000:.1f} | "
                     f"{on['e2e_p50']:.2f} / {off['e2e_p50']:.2f} | {on['out_tok_s']:.1f} / {off['out_tok_s']:.1f} | "
                     f"{on['handoff_s']/on['ttft_mean']*100:.1f}% |")
    text = (f"bench checkpoint {args.family} (24 layers x 512, bf16), text {args.text_tokens} tokens, image "
            f"{args.image_side}x{args.image_side}, {args.max_tokens} output tokens, streaming\n\n" + head + "\n".join(lines))
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
