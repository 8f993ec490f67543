"""engine.stream_interval side by side: the same loads against servers that differ only in it.

    python bench/stream_interval.py [--intervals 1,4] [--rounds 2] [--out bench/results/stream-interval.md]

For each round, starts popserve on the bench checkpoint once per interval (the order alternates
between rounds), and runs 448x448 images at 8 clients (the load that saturates the cores) and
64-token text prompts at 1 client. Besides TTFT / TPOT / ITL / tok/s it reads the CPU seconds of
the processes a streamed token passes through (Decode, Ingress, Serve's proxy) from /proc.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bodies_for, run_load, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROCESSES = {"Decode": "ServeReplica:popserve:Decode", "Ingress": "ServeReplica:popserve:Ingress",
             "proxy": "ProxyActor"}
LOADS = (("image448", 8, 20), ("text64", 1, 10))  # workload, clients, requests


def cpu_seconds() -> dict[str, float]:
    out = dict.fromkeys(PROCESSES, 0.0)
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        title = " ".join(proc.info.get("cmdline") or [])
        for name, marker in PROCESSES.items():
            if marker in title and proc.info["cpu_times"]:
                out[name] += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return out


def run_arm(model: str, interval: int, port: int, tok, seed: int, max_tokens: int) -> dict:
    from popserve.service import launcher
    from popserve.service.config import ServeConfig

    cfg = ServeConfig.model_validate({"model": model, "port": port, "engine": {
        "max_running_seqs": 16, "max_seq_len": 4096, "stream_interval": interval}}).resolved()
    launcher.start(cfg)
    url, name = f"http://127.0.0.1:{port}/v1/chat/completions", cfg.model_name()
    out = {}
    try:
        asyncio.run(run_load(url, bodies_for("text64", name, tok, 3, -1000, 4), 1))  # warm-up
        for workload, clients, n in LOADS:
            bodies = bodies_for(workload, name, tok, n, seed, max_tokens)
            seed += n
            before = cpu_seconds()
            res = asyncio.run(run_load(url, bodies, clients))
            after = cpu_seconds()
            tokens = res["out_tok_s"] * res["wall_s"]
            res["cpu_ms_per_token"] = {k: (after[k] - before[k]) * 1000 / max(1.0, tokens) for k in PROCESSES}
            out[(workload, clients)] = res
            print(f"interval {interval} {workload} c={clients}: {res['out_tok_s']:.1f} tok/s, TTFT p50 "
                  f"{res['ttft_p50']*1000:.0f} ms, ITL p50 {res['itl_p50']*1000:.1f} ms, CPU ms/token "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_ms_per_token"].items()), flush=True)
    finally:
        launcher.stop()
    return out


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from popserve.models.tiny import make_tiny

    ap = argparse.ArgumentParser()
    ap.add_argument("--intervals", default="1,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--out", default="bench/results/stream-interval.md")
    args = ap.parse_args(argv)

    model = str(Path(tempfile.gettempdir()) / "popserve-bench" / "bench-qwen3-vl")
    if not (Path(model) / "config.json").exists():
        make_tiny("qwen3-vl", "bench", model)
    tok = AutoTokenizer.from_pretrained(model)
    intervals = [int(x) for x in args.intervals.split(",")]
    runs: dict[int, list[dict]] = {i: [] for i in intervals}
    seed = 0
    for rnd in range(args.rounds):
        for interval in (intervals if rnd % 2 == 0 else intervals[::-1]):
            seed += 1000
            runs[interval].append(run_arm(model, interval, args.port, tok, seed, args.max_tokens))

    def med(interval, load, key, sub=None):
        vals = [r[load][key][sub] if sub else r[load][key] for r in runs[interval]]
        return statistics.median(vals)

    lines = [f"bench Qwen3-VL, {os.cpu_count()} cores, {args.max_tokens} output tokens, streaming, unique prompts/images; "
             f"medians of {args.rounds} server starts per interval, the order alternating",
             "", "| load | stream_interval | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p50 / p90 (ms) | "
             + " | ".join(f"{k} CPU ms / token" for k in PROCESSES) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(PROCESSES)]
    for workload, clients, _ in LOADS:
        load = (workload, clients)
        for i in intervals:
            lines.append(f"| {workload}, {clients} clients | {i} | {med(i, load, 'out_tok_s'):.1f} | "
                         f"{med(i, load, 'ttft_p50')*1000:.0f} | {med(i, load, 'tpot_p50')*1000:.1f} | "
                         f"{med(i, load, 'itl_p50')*1000:.1f} / {med(i, load, 'itl_p90')*1000:.1f} | "
                         + " | ".join(f"{med(i, load, 'cpu_ms_per_token', k):.2f}" for k in PROCESSES) + " |")
        base = intervals[0]
        for i in intervals[1:]:
            lines.append(f"| {workload}, {clients} clients | {i} vs {base} | "
                         f"{med(i, load, 'out_tok_s') / med(base, load, 'out_tok_s'):.2f}x | | | | "
                         + " | ".join(f"{med(i, load, 'cpu_ms_per_token', k) / max(1e-9, med(base, load, 'cpu_ms_per_token', k)):.2f}x"
                                      for k in PROCESSES) + " |")
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
