"""popserve against the servers a user would pick instead, same checkpoint, same load, one run.

    python bench/peers.py [--family qwen3-vl] [--workloads text512,text2048,image448] [--concurrency 1,4,8,16]

Each server runs alone on loopback, started by this script: popserve (requests with "pop": true,
then the same server with "pop": false, which routes to its full-depth prefill replicas) and
`transformers serve` (same venv; sequential: its continuous batching does not cover Qwen3-VL).
Both get the same compute dtype (--dtype, default: popserve's CPU policy, float32 on CPUs that
only emulate bf16). Writes bench/results/peers.md, peers.json and peers.png and prints our ratios.
Workloads (bench/loadgen.py): text<N> and image<S> are unique per request (the issue's loads);
shared<N> (one N-token system prompt) and sameimage<S> (one image) share their start, which
popserve's prefix cache serves (--workloads shared1009,sameimage448).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (bench_checkpoint, bodies_for, request_fields, results_tables, run_load,  # noqa: E402
                     sharing_note, warm_up)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}/v1/models", timeout=5)
            if r.status_code == 200 and r.json()["data"]:
                return r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(2)
    raise TimeoutError(base)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def drive(url: str, name: str, tok, args, extra: dict, label: str, results: dict) -> None:
    seed = hash(label) % 100000 * 1000
    warm_up(url, name, tok, args.workloads.split(","), extra)
    for w in args.workloads.split(","):
        for c in map(int, args.concurrency.split(",")):
            seed += 1000
            n = max(args.requests, c)
            res = asyncio.run(run_load(url, bodies_for(w, name, tok, n, seed, args.max_tokens, extra), c,
                                       time_limit_s=args.time_limit))
            results[(label, w, c)] = res
            print(f"{label:16s} {w:9s} c={c:2d} ok={res['ok']}/{res['requests']} TTFT p50={res['ttft_p50']*1000:7.0f} ms "
                  f"TPOT p50={res['tpot_p50']*1000:6.1f} ms ITL p50/p90/p99={res['itl_p50']*1000:.1f}/"
                  f"{res['itl_p90']*1000:.1f}/{res['itl_p99']*1000:.1f} ms  {res['out_tok_s']:6.1f} tok/s "
                  f"errors={res['errors']}", flush=True)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from popserve.models.loading import torch_dtype
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--model")
    ap.add_argument("--workloads", default="text512,text2048,image448")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=20, help="per (server, workload, clients); the issue's reference used 20")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--dtype", default=None, help="compute dtype for every server (default: popserve's auto)")
    ap.add_argument("--peers", default="popserve,transformers")
    ap.add_argument("--serve-config", help="a popserve YAML config (e.g. bench/gpu-8b.yaml: stages sharing a GPU)")
    ap.add_argument("--body", default="{}", help='JSON fields added to every request, e.g. sampling: '
                    '\'{"temperature": 0.7, "top_k": 20, "top_p": 0.8}\' (default: greedy)')
    ap.add_argument("--out", default="bench/results/peers")
    args = ap.parse_args(argv)
    body = request_fields(args.body)

    model = bench_checkpoint(args.family, args.model)
    cfg = json.loads((Path(model) / "config.json").read_text())
    dtype = args.dtype or str(torch_dtype("auto", cfg.get("dtype") or cfg.get("text_config", {}).get("dtype"))).split(".")[-1]
    tok = AutoTokenizer.from_pretrained(model)
    logs = Path(args.out).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    if "popserve" in args.peers:
        port = 8231
        # The installed command, or the module where the project runs from a path (a GPU node).
        popserve = [str(VENV_BIN / "popserve")] if (VENV_BIN / "popserve").exists() else [
            sys.executable, "-m", "popserve.service.cli"]
        config = ["--config", args.serve_config] if args.serve_config else []
        proc = start([*popserve, "serve", *config, "--model", model, "--port", str(port), "--dtype", dtype],
                     logs / "popserve.log")
        try:
            base = f"http://127.0.0.1:{port}"
            name = wait_ready(base, proc)
            for pop in (True, False):
                drive(f"{base}/v1/chat/completions", name, tok, args, {**body, "pop": pop},
                      "popserve POP" if pop else "popserve POP off", results)
            # The server's own counters (KV handoff seconds and bytes, stage busy time) for the run,
            # once Ray's metrics agent has collected the last requests' (every 10 s).
            time.sleep(11)
            out = Path(args.out)
            out.with_name(out.name + "-metrics.txt").write_text(httpx.get(f"{base}/metrics", timeout=30).text)
        finally:
            stop(proc)
    if "transformers" in args.peers:
        port = 8232
        proc = start([str(VENV_BIN / "transformers"), "serve", model, "--port", str(port), "--device", "cpu",
                      "--dtype", dtype], logs / "transformers-serve.log")
        try:
            base = f"http://127.0.0.1:{port}"
            name = wait_ready(base, proc)
            drive(f"{base}/v1/chat/completions", name, tok, args, body, "transformers serve", results)
        finally:
            stop(proc)

    text_cfg = cfg.get("text_config", cfg)
    shape = f"{Path(model).name} ({text_cfg['num_hidden_layers']} layers x {text_cfg['hidden_size']})"
    report(results, args, dtype, shape)
    return 0


def report(results: dict, args, dtype: str, shape: str) -> None:
    import torch

    out = Path(args.out)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    labels = sorted({k[0] for k in results}, key=["popserve POP", "popserve POP off", "transformers serve"].index)
    prompts = sharing_note(args.workloads.split(","))
    text = (f"{args.family} checkpoint {shape}, compute dtype {dtype}, {args.max_tokens} output tokens, "
            f"streaming, {prompts}, {os.cpu_count()} cores{gpu}"
            f"{', requests add ' + args.body if json.loads(args.body) else ''}"
            f"{', config ' + args.serve_config if args.serve_config else ''}\n\n" + results_tables(results, "popserve POP"))
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in results.items()}, indent=1))
    print("\n" + text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        workloads = args.workloads.split(",")
        fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
        for j, w in enumerate(workloads):
            for label in labels:
                cs = sorted(c for (l, ww, c) in results if l == label and ww == w)
                axes[0][j].plot(cs, [results[(label, w, c)]["ttft_p50"] for c in cs], marker="o", label=label)
                axes[1][j].plot(cs, [results[(label, w, c)]["out_tok_s"] for c in cs], marker="o", label=label)
            axes[0][j].set_title(f"{w}: TTFT p50 (s)")
            axes[1][j].set_title(f"{w}: output tok/s")
            axes[1][j].set_xlabel("concurrent clients")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=90)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
