"""popserve's engine in one process, POP on and off side by side: the same stages as the server
(vision encoder, POP-pruned prefill, the continuous-batching DecodeScheduler) without Ray or HTTP.

    python bench/engine.py --shape 8b --device cuda          # a GPU node: Qwen3-VL-8B shape, bf16
    python bench/engine.py --requests 2 --concurrency 1,2    # CPU smoke run on the bench shape

For a GPU node that has no Ray (the lent H200 has none, and Ray's wheel is larger than what travels
there), and to see the engine's own speed apart from serving overhead. Stages run in threads of one
process instead of replicas: prefill batches the prompts waiting for it up to a token budget (as the
prefill deployment's Serve batcher does), the KV handoff stays on the device (in the server it
crosses Ray's object store: the script times that host round trip on its own). Every request builds
its prompt through the checkpoint's processor and chat template inside the timed region, prompts
and images are unique, and decoding runs exactly --max-tokens tokens (no stop tokens: random weights).
Writes <out>.md and <out>.json with the same tables as bench/peers.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Result, noise_image, results_tables, summarize, text_prompt  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUESTION = "What is in this image? Answer briefly in a few words please."


class PrefillBatcher:
    """One prefill runner; the prompts waiting when it frees up run as one batch of at most
    `budget` tokens (a longer prompt runs alone), like the prefill deployment's batcher."""

    def __init__(self, runner, budget: int):
        self.runner, self.budget = runner, budget
        self.queue: list = []
        self.wake = asyncio.Event()
        self.task = None

    async def prefill(self, request):
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((request, fut))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.wake.set()
        return await fut

    async def _loop(self):
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                batch, tokens = [], 0
                while self.queue and (not batch or tokens + self.queue[0][0].input_ids.numel() <= self.budget):
                    batch.append(self.queue.pop(0))
                    tokens += batch[-1][0].input_ids.numel()
                try:
                    handoffs = await asyncio.to_thread(self.runner.prefill, [r for r, _ in batch])
                except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                    for _, fut in batch:
                        fut.set_exception(exc)
                else:
                    for (_, fut), h in zip(batch, handoffs):
                        fut.set_result(h)


class Engine:
    def __init__(self, model: Path, pop_ratio: float, dtype: str, device: str, max_seq_len: int, budget: int):
        from popserve.models.decoder import FullDecoder
        from popserve.models.encoder import VisionEncoder
        from popserve.models.prefill import PrunedPrefill
        from popserve.models.prompt import PromptBuilder
        from popserve.service.engine.scheduler import DecodeScheduler

        self.load_s = {}
        t = time.perf_counter()
        self.builder = PromptBuilder(model)
        self.encoder = VisionEncoder(model, dtype, device)
        self.load_s["encoder"] = time.perf_counter() - t
        self.prefill = {}
        for label, ratio in (("POP", pop_ratio), ("POP off", 0.0)):
            t = time.perf_counter()
            self.prefill[label] = PrefillBatcher(PrunedPrefill(model, ratio, dtype, device), budget)
            self.load_s[f"prefill {label}"] = time.perf_counter() - t
        t = time.perf_counter()
        # One decoder for both: it accepts handoffs of full prefill (k=0) and of POP at pop_ratio.
        self.decoder = FullDecoder(model, pop_ratio, dtype, device, max_seqs=16, max_seq_len=max_seq_len)
        self.load_s["decoder"] = time.perf_counter() - t
        self.scheduler = DecodeScheduler(self.decoder, stop_token_ids=(), max_waiting=256)
        self.encoder_lock = asyncio.Lock()

    async def request(self, mode: str, text: str, image, max_tokens: int) -> Result:
        from popserve.models.prefill import PrefillRequest
        from popserve.models.sampling import SamplingParams

        t0 = time.perf_counter()
        content = text if image is None else [{"type": "image"}, {"type": "text", "text": text}]
        prompt = await asyncio.to_thread(self.builder.build, [{"role": "user", "content": content}],
                                         [image] if image is not None else None)
        feats = []
        if prompt.pixels:
            async with self.encoder_lock:  # one encoder replica
                feats = await asyncio.to_thread(self.encoder.encode_pixels, prompt.pixels)
        handoff = await self.prefill[mode].prefill(PrefillRequest(prompt.input_ids, prompt.mm_token_type_ids, feats))
        first = last = None
        itl, tokens = [], 0
        async for items in self.scheduler.generate(handoff, SamplingParams(max_new_tokens=max_tokens)):
            now = time.perf_counter()
            tokens += len(items)
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last = now
        return Result(True, first - t0, time.perf_counter() - t0, itl, tokens)


async def run_load(engine: Engine, mode: str, workload: str, clients: int, n: int, seed: int, max_tokens: int) -> dict:
    tok = engine.builder.tokenizer
    if workload.startswith("text"):
        inputs = [(text_prompt(tok, int(workload[4:]), seed + i), None) for i in range(n)]
    else:
        inputs = [(QUESTION, noise_image(int(workload[5:]), seed + i)) for i in range(n)]
    sem = asyncio.Semaphore(clients)
    results: list[Result] = []

    async def client(text, image):
        async with sem:
            try:
                results.append(await engine.request(mode, text, image, max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted as an error, like a failed HTTP request
                results.append(Result(False, error=f"{type(exc).__name__}: {exc}"[:200]))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(t, i) for t, i in inputs))
    return summarize(results, time.perf_counter() - t0)


def handoff_host_round_trip(engine: Engine, tokens: int, repeats: int = 5) -> dict:
    """What crossing host memory (as through Ray's object store) adds to one handoff of `tokens`."""
    from popserve.models.prefill import PrefillRequest

    ids = torch.randint(100, 1000, (tokens + 1,))
    kv = engine.prefill["POP"].runner.prefill([PrefillRequest(ids)])[0].kv
    times = []
    for _ in range(repeats + 1):
        if kv.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        back = kv.cpu().to(kv.device)
        if kv.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del back
    s = sorted(times[1:])[len(times[1:]) // 2]
    return {"tokens": tokens, "bytes": kv.numel() * kv.element_size(), "seconds": s}


def model_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that pick the checkpoint, device and POP ratio (read by `checkpoint`)."""
    ap.add_argument("--shape", default="bench", choices=["bench", "8b"], help="random Qwen3-VL built if missing")
    ap.add_argument("--model", help="a checkpoint directory instead of --shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--ratio", type=float, default=1 / 3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "popserve-bench"))
    return ap


def checkpoint(args) -> tuple[Path, float]:
    """--model, or a random Qwen3-VL of --shape under --cache, built on --device if missing
    (returns the seconds the build took, 0 if none)."""
    from popserve.models.tiny import make_tiny

    model = Path(args.model) if args.model else Path(args.cache) / f"{args.shape}-qwen3-vl"
    if (model / "config.json").exists():
        return model, 0.0
    t = time.perf_counter()
    make_tiny("qwen3-vl", args.shape, model, device=args.device)
    print(f"built {model} in {time.perf_counter() - t:.0f} s", flush=True)
    return model, time.perf_counter() - t


def what_model(args) -> str:
    return args.model or f"Qwen3-VL {args.shape} shape with random weights"


async def bench(args) -> dict:
    model, build_s = checkpoint(args)
    longest = max([int(w[4:]) for w in args.workloads.split(",") if w.startswith("text")] + [512])
    engine = Engine(model, args.ratio, args.dtype, args.device, longest + args.max_tokens + 256, args.prefill_tokens)
    print("loaded: " + ", ".join(f"{k} {v:.0f} s" for k, v in engine.load_s.items()), flush=True)

    for mode in engine.prefill:  # warm-up: kernels, handles and the allocator, not counted
        await run_load(engine, mode, "text64", 2, 2, 10**6, 4)
        await run_load(engine, mode, "image448", 1, 1, 10**6, 4)
    results = {}
    seed = 0
    for w in args.workloads.split(","):
        for c in map(int, args.concurrency.split(",")):
            seed += 1000
            modes = list(engine.prefill) if seed // 1000 % 2 else list(engine.prefill)[::-1]
            for mode in modes:  # alternate which mode goes first
                res = await run_load(engine, mode, w, c, max(args.requests, c), seed, args.max_tokens)
                results[(f"engine {mode}", w, c)] = res
                print(f"engine {mode:8s} {w:9s} c={c:2d} ok={res['ok']}/{res['requests']} TTFT p50="
                      f"{res['ttft_p50']*1000:7.1f} ms TPOT p50={res['tpot_p50']*1000:6.1f} ms "
                      f"{res['out_tok_s']:7.1f} tok/s errors={res['errors']}", flush=True)
    # On a CPU the handoff already lives in host memory: nothing to time.
    trip = handoff_host_round_trip(engine, longest) if engine.decoder.device.type != "cpu" else None
    dec = engine.decoder
    return {"model": str(model), "build_s": build_s, "load_s": engine.load_s, "results": results,
            "handoff_host_round_trip": trip, "compute_dtype": str(dec.dtype).split(".")[-1],
            "layers": dec.family.num_layers, "skipped": engine.prefill["POP"].runner.k,
            "params": sum(p.numel() for m in (dec.layers, dec.text) for p in m.parameters()) + dec.lm_head.weight.numel(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}


def main(argv=None) -> int:
    import transformers

    ap = model_arguments(argparse.ArgumentParser())
    ap.add_argument("--workloads", default="text512,text2048,image448")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=8, help="per run (at least the run's clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="prefill batch budget (the server's default)")
    ap.add_argument("--out", default=None, help="default bench/results/engine-<shape>-<device>")
    args = ap.parse_args(argv)
    out = Path(args.out or f"bench/results/engine-{args.shape}-{args.device}")

    r = asyncio.run(bench(args))
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores")
    trip, handoff = r["handoff_host_round_trip"], ""
    if trip:
        pop_ttft = r["results"].get(("engine POP", f"text{trip['tokens']}", 1), {}).get("ttft_p50")
        handoff = (f"\nKV handoff of a {trip['tokens']}-token prompt ({trip['bytes']/2**20:.0f} MiB) through host "
                   f"memory and back: {trip['seconds']*1000:.1f} ms"
                   + (f" ({trip['seconds']/pop_ttft:.0%} of that prompt's POP TTFT at 1 client)" if pop_ttft else "")
                   + ".")
    text = (f"popserve engine in one process (no Ray, no HTTP) on {where}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}; {what_model(args)} ({r['params']/1e9:.2f}B text "
            f"parameters, {r['layers']} layers, POP skips {r['skipped']}), compute dtype {r['compute_dtype']}; "
            f"{args.max_tokens} output tokens, unique prompts/images, prompt building timed.\n\n"
            + results_tables(r["results"], "engine POP")
            + handoff + "\nLoad: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["load_s"].items())
            + (f"; random checkpoint built in {r['build_s']:.0f} s" if r["build_s"] else "")
            + (f"; peak GPU memory {r['peak_gpu_bytes']/2**30:.1f} GiB" if r["peak_gpu_bytes"] else "") + ".\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    r["results"] = {"|".join(map(str, k)): v for k, v in r["results"].items()}
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
