"""Config settings side by side: the same loads against servers that differ only in them.

    python bench/config_ab.py --arm engine.stream_interval=1 --arm engine.stream_interval=4
    python bench/config_ab.py --arm "" --arm encoder.omp_spin_count=3000,prefill.omp_spin_count=3000 \
        --loads image448:1:8,image448:16:32 --out bench/results/omp-spin.md

An arm is a comma-separated list of dotted ServeConfig settings ("" is the default config). For
each round, starts popserve on the bench checkpoint once per arm (the order alternates between
rounds) and runs every load ("workload:clients:requests"; workloads as in bench/peers.py). Besides
TTFT / TPOT / ITL / tok/s it reads the CPU seconds of each stage's processes from /proc, per
output token, of this load generator, and of everything else on the machine ("rest": Ray's own
processes) and how much of the cores stayed idle; from the decode replica, the handoff's mean
time and the mean decode batch (tokens per step: small batches cost the most CPU per token).
Medians over the rounds, and each arm's ratios against the first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (bench_checkpoint, bodies_for, request_fields, run_load, sharing_note,  # noqa: E402
                     warm_up, write_report)
from serve import decode_stats  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROCESSES = {"Encoder": "ServeReplica:popserve:VisionEncoder", "Prefill": "ServeReplica:popserve:Prefill ",
             "Decode": "ServeReplica:popserve:Decode", "Ingress": "ServeReplica:popserve:Ingress",
             "proxy": "ProxyActor"}
BASE = {"port": 8124, "engine": {"max_running_seqs": 16, "max_seq_len": 4096}}


def parse_arm(text: str) -> dict:
    """"engine.stream_interval=4,encoder.omp_spin_count=3000" -> nested overrides (JSON values)."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_loads(text: str) -> list[tuple[str, int, int]]:
    return [(w, int(c), int(n)) for w, c, n in (s.split(":") for s in text.split(","))]


def cpu_seconds() -> dict[str, float]:
    """By process title: `ray::ServeReplica:popserve:Prefill ` (the space keeps PrefillFull out);
    "loadgen": this process's; "busy" and "idle": the whole machine's (all cores)."""
    out = dict.fromkeys(PROCESSES, 0.0)
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        title = " ".join(proc.info.get("cmdline") or []) + " "
        for name, marker in PROCESSES.items():
            if marker in title and proc.info["cpu_times"]:
                out[name] += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    own = psutil.Process().cpu_times()  # this process: the load generator's clients
    out["loadgen"] = own.user + own.system
    machine = psutil.cpu_times()
    out["idle"] = machine.idle + getattr(machine, "iowait", 0.0)
    # guest time is counted in user time already; steal is the hypervisor's, not this machine's work
    out["busy"] = sum(machine) - out["idle"] - sum(getattr(machine, k, 0.0) for k in ("guest", "guest_nice", "steal"))
    return out


def load_counters(before: dict, after: dict, stats_before: dict, stats_after: dict, tokens: float, wall_s: float) -> dict:
    """What one load cost: CPU ms per output token by stage and for the rest of the machine, the
    idle share of all cores, the handoff's mean time and decode's mean batch (tokens per step)."""
    per_token = {k: (after[k] - before[k]) * 1000 / max(1.0, tokens) for k in [*PROCESSES, "loadgen"]}
    per_token["rest"] = (after["busy"] - before["busy"]) * 1000 / max(1.0, tokens) - sum(per_token.values())
    delta = {k: stats_after[k] - stats_before[k] for k in ("handoffs", "handoff_seconds", "steps", "tokens_out")}
    return {"cpu_ms_per_token": per_token,
            "idle_pct": 100 * (after["idle"] - before["idle"]) / max(1e-9, wall_s * (psutil.cpu_count() or 1)),
            "handoff_ms": delta["handoff_seconds"] * 1000 / max(1, delta["handoffs"]),  # prefill done -> KV in decode's pool
            "decode_batch": delta["tokens_out"] / max(1, delta["steps"])}


def run_arm(model: str, base: dict, arm: str, loads, tok, seed: int, max_tokens: int, body: dict | None = None) -> dict:
    from popserve.service import launcher
    from popserve.service.config import ServeConfig

    cfg = ServeConfig.model_validate(merged({**base, "model": model}, parse_arm(arm))).resolved()
    launcher.start(cfg)
    url, name = f"http://127.0.0.1:{cfg.port}/v1/chat/completions", cfg.model_name()
    out = {}
    try:
        warm_up(url, name, tok, dict.fromkeys(w for w, _, _ in loads), body)
        for workload, clients, n in loads:
            bodies = bodies_for(workload, name, tok, n, seed, max_tokens, body)
            seed += n
            before, stats_before = cpu_seconds(), decode_stats()
            res = asyncio.run(run_load(url, bodies, clients))
            after, stats_after = cpu_seconds(), decode_stats()
            res.update(load_counters(before, after, stats_before, stats_after, res["out_tok_s"] * res["wall_s"], res["wall_s"]))
            out[(workload, clients)] = res
            print(f"[{arm or 'default'}] {workload} c={clients}: {res['out_tok_s']:.1f} tok/s, TTFT p50 "
                  f"{res['ttft_p50']*1000:.0f} ms, ITL p50 {res['itl_p50']*1000:.1f} ms, "
                  f"handoff mean {res['handoff_ms']:.1f} ms, decode batch {res['decode_batch']:.1f}, "
                  f"idle {res['idle_pct']:.0f}%, CPU ms/token "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_ms_per_token"].items()), flush=True)
    finally:
        launcher.stop()
    return out


def report(runs: dict[str, list[dict]], loads, header: str) -> str:
    arms = list(runs)

    def med(arm, load, key, sub=None):
        return statistics.median(r[load][key][sub] if sub else r[load][key] for r in runs[arm])

    name = lambda arm: f"`{arm}`" if arm else "default"  # noqa: E731
    cpus = [*PROCESSES, "loadgen", "rest"]
    lines = [header, "", "| load | arm | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p50 / p90 (ms) | "
             "handoff, mean (ms) | decode batch, mean | idle (% of cores) | "
             + " | ".join(f"{k} CPU ms / token" for k in cpus) + " |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(cpus)]
    for workload, clients, _ in loads:
        load, who = (workload, clients), f"{workload}, {clients} client{'s' if clients > 1 else ''}"
        for arm in arms:
            lines.append(f"| {who} | {name(arm)} | {med(arm, load, 'out_tok_s'):.1f} | "
                         f"{med(arm, load, 'ttft_p50')*1000:.0f} | {med(arm, load, 'tpot_p50')*1000:.1f} | "
                         f"{med(arm, load, 'itl_p50')*1000:.1f} / {med(arm, load, 'itl_p90')*1000:.1f} | "
                         f"{med(arm, load, 'handoff_ms'):.1f} | {med(arm, load, 'decode_batch'):.1f} | "
                         f"{med(arm, load, 'idle_pct'):.0f} | "
                         + " | ".join(f"{med(arm, load, 'cpu_ms_per_token', k):.2f}" for k in cpus) + " |")
        for arm in arms[1:]:
            ratio = lambda key, sub=None: med(arm, load, key, sub) / max(1e-9, med(arms[0], load, key, sub))  # noqa: E731
            lines.append(f"| {who} | {name(arm)} / {name(arms[0])} | {ratio('out_tok_s'):.2f}x | "
                         f"{ratio('ttft_p50'):.2f}x | {ratio('tpot_p50'):.2f}x | | {ratio('handoff_ms'):.2f}x | "
                         f"{ratio('decode_batch'):.2f}x | | "
                         + " | ".join(f"{ratio('cpu_ms_per_token', k):.2f}x" for k in cpus) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", action="append", required=True,
                    help='dotted settings, e.g. "engine.stream_interval=4,decode.torch_threads=2"; "" = defaults')
    ap.add_argument("--loads", default="image448:8:20,text64:1:10", help="workload:clients:requests,...")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", help="checkpoint directory (default: the bench Qwen3-VL, built if missing)")
    ap.add_argument("--config", help="a popserve YAML config the arms start from (e.g. bench/gpu-8b.yaml)")
    ap.add_argument("--body", default="{}", help='JSON fields added to every request, e.g. sampling: '
                    '\'{"temperature": 0.7, "top_k": 20, "top_p": 0.8}\' (default: greedy)')
    ap.add_argument("--out", default="bench/results/config-ab.md")
    args = ap.parse_args(argv)
    from popserve.service.config import ServeConfig

    base = merged(BASE, yaml.safe_load(Path(args.config).read_text()) if args.config else {})
    for arm in args.arm:  # a typo fails here, not after the first server start
        ServeConfig.model_validate(merged({**base, "model": "x"}, parse_arm(arm)))

    body = request_fields(args.body)  # a mistake fails here, not after the first server start
    model = bench_checkpoint("qwen3-vl", args.model)
    tok = AutoTokenizer.from_pretrained(model)
    loads = parse_loads(args.loads)
    runs: dict[str, list[dict]] = {a: [] for a in args.arm}
    seed = 0
    for rnd in range(args.rounds):
        for arm in (args.arm if rnd % 2 == 0 else args.arm[::-1]):
            seed += 1000
            runs[arm].append(run_arm(model, base, arm, loads, tok, seed, args.max_tokens, body))
    header = (f"{Path(model).name}, {os.cpu_count()} cores{', config ' + args.config if args.config else ''}, "
              f"{args.max_tokens} output tokens, streaming, {sharing_note(w for w, _, _ in loads)}"
              f"{', requests add ' + args.body if json.loads(args.body) else ''}; "
              f"medians of {args.rounds} "
              f"server starts per arm, the order alternating")
    write_report(args.out, report(runs, loads, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
