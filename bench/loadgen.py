"""Load generation against any OpenAI-compatible server (asyncio + httpx, loopback only).

Bounded in request count and time. Every prompt and image is unique (no cache hits), except in the
prefix-sharing workloads (shared<N>, sameimage<S>), where each prompt starts like the others and
ends in its own question. Shared by
bench/serve.py (POP on vs off) and bench/peers.py (popserve vs other servers); write_report for
every bench script's markdown.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

def bench_checkpoint(family: str = "qwen3-vl", model: Optional[str] = None) -> str:
    """`model` (a directory or hub id) as given, or else the random-weight bench checkpoint of
    `family`, built on first use under the temp directory."""
    if model:
        return model
    path = Path(tempfile.gettempdir()) / "popserve-bench" / f"bench-{family}"
    if not (path / "config.json").exists():
        from popserve.models.tiny import make_tiny

        make_tiny(family, "bench", str(path))
    return str(path)


WORDS = ("the sea boy water light house tree city story picture animal mother world point "
         "answer school plant night river stone cloud garden window morning letter").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


SHARED_SEED = 7_777_777  # the prefix every request of a prefix-sharing workload starts with


def text_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    """A unique prompt of about n_tokens tokens under this tokenizer (chat template excluded)."""
    rng = random.Random(seed)
    words = [f"{rng.choice(WORDS)}{rng.randint(0, 999)}" for _ in range(n_tokens)]
    ids = tokenizer(" ".join(words))["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def noise_image(side: int, seed: int):
    """A unique RGB noise image (PIL)."""
    from PIL import Image

    rng = random.Random(seed)
    return Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))


def noise_image_url(side: int, seed: int) -> str:
    buf = io.BytesIO()
    noise_image(side, seed).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    t0 = time.perf_counter()
    first, last, itl, tokens = None, None, [], 0
    try:
        async with client.stream("POST", url, json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return Result(False, error=str(ev["error"])[:200])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return Result(False, error=type(exc).__name__)
    end = time.perf_counter()
    if first is None:
        return Result(False, error="no tokens")
    return Result(True, first - t0, end - t0, itl, tokens or (len(itl) + 1))


async def run_load(url: str, bodies: list[dict], concurrency: int, time_limit_s: float = 600.0) -> dict:
    """Send `bodies` with at most `concurrency` in flight; returns aggregate metrics."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    results: list[Result] = []
    deadline = time.monotonic() + time_limit_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        async def worker(body):
            async with sem:
                if time.monotonic() > deadline:
                    return
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(b) for b in bodies))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[Result], wall: float) -> dict:
    """Aggregate metrics of one load run (every request's Result, the run's wall time)."""
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / max(1, r.tokens - 1) for r in ok if r.tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": errors, "wall_s": wall,
        "ttft_p50": percentile([r.ttft for r in ok], 50), "ttft_p90": percentile([r.ttft for r in ok], 90),
        "ttft_p99": percentile([r.ttft for r in ok], 99),
        "tpot_p50": percentile(tpot, 50),
        "itl_p50": percentile(itl, 50), "itl_p90": percentile(itl, 90), "itl_p99": percentile(itl, 99),
        "e2e_p50": percentile([r.e2e for r in ok], 50),
        "out_tok_s": sum(r.tokens for r in ok) / wall if wall else 0.0,
        "ttft_mean": statistics.fmean([r.ttft for r in ok]) if ok else float("nan"),
    }


RESERVED = ("model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "pop")


def request_fields(text: str) -> dict:
    """A benchmark's --body: JSON fields added to every request (sampling, say), never ones the
    benchmark sets itself: the report would describe another load."""
    body = json.loads(text)
    if not isinstance(body, dict):
        raise SystemExit(f"--body must be a JSON object, not {text}")
    if taken := sorted(set(body) & set(RESERVED)):
        raise SystemExit(f"--body may not set {', '.join(taken)}: the benchmark sets them")
    return body


def chat_body(model: str, text: str, image_url: Optional[str], max_tokens: int, extra: dict | None = None,
              system: Optional[str] = None) -> dict:
    content = text if image_url is None else [{"type": "image_url", "image_url": {"url": image_url}},
                                              {"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **(extra or {})}


def warm_up(url: str, name: str, tok, workloads, extra: dict | None = None) -> None:
    """One unmeasured request per workload: a server's first prompt of a new length pays one-time
    costs (heap growth, page faults, new GEMM shapes); popserve's first 2048-token POP prompt after a
    start took 1757 ms against ~1500 for the next ones."""
    for i, w in enumerate(workloads):
        asyncio.run(run_load(url, bodies_for(w, name, tok, 1, -10_000 - i, 4, extra), 1))


def sharing_note(workloads) -> str:
    """How the report's prompts relate, for its header."""
    sharing = [w for w in workloads if w.startswith(("shared", "sameimage"))]
    if not sharing:
        return "unique prompts/images"
    return f"unique prompts/images except the shared start of {', '.join(sharing)} (a unique question each)"


def bodies_for(workload: str, name: str, tok, n: int, seed0: int, max_tokens: int, extra: dict | None = None) -> list[dict]:
    """n requests of a workload, seeds seed0..: "text<N>" (a unique N-token prompt), "image<S>" (a
    unique SxS noise image and a short question); sharing a prefix: "shared<N>" (the same N-token
    system prompt, then a unique question of about 24 tokens), "sameimage<S>" (the same SxS image,
    then a unique question)."""
    out = []
    for i in range(n):
        seed = seed0 + i
        if workload.startswith("text"):
            out.append(chat_body(name, text_prompt(tok, int(workload[4:]), seed), None, max_tokens, extra))
        elif workload.startswith("shared"):
            out.append(chat_body(name, text_prompt(tok, 24, seed), None, max_tokens, extra,
                                 system=text_prompt(tok, int(workload[6:]), SHARED_SEED)))
        elif workload.startswith("sameimage"):
            out.append(chat_body(name, f"Question {seed}: what is in this image? " + text_prompt(tok, 12, seed),
                                 noise_image_url(int(workload[9:]), SHARED_SEED), max_tokens, extra))
        else:
            side = int(workload[5:])
            out.append(chat_body(name, "What is in this image? Answer briefly in a few words please.",
                                 noise_image_url(side, seed), max_tokens, extra))
    return out


def results_tables(results: dict, ours: str) -> str:
    """Markdown: one row per (label, workload, clients) run, then `ours` against every other label."""
    lines = ["| server | workload | clients | TTFT p50 / p90 / p99 (ms) | TPOT p50 (ms) | ITL p50 / p90 / p99 (ms) | "
             "output tok/s | errors |", "|---|---|---|---|---|---|---|---|"]
    for (label, w, c), r in results.items():
        lines.append(f"| {label} | {w} | {c} | {r['ttft_p50']*1000:.0f} / {r['ttft_p90']*1000:.0f} / {r['ttft_p99']*1000:.0f} | "
                     f"{r['tpot_p50']*1000:.1f} | {r['itl_p50']*1000:.1f} / {r['itl_p90']*1000:.1f} / {r['itl_p99']*1000:.1f} | "
                     f"{r['out_tok_s']:.1f} | {sum(r['errors'].values())} |")
    lines += ["", "| workload | clients | peer | TTFT ratio (peer / ours, >1 = we are faster) | output tok/s ratio (ours / peer) |",
              "|---|---|---|---|---|"]
    for (label, w, c), r in results.items():
        mine = results.get((ours, w, c))
        if label != ours and mine and mine["ok"] and r["ok"]:
            lines.append(f"| {w} | {c} | vs {label} | {r['ttft_p50']/mine['ttft_p50']:.2f}x | "
                         f"{mine['out_tok_s']/r['out_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, text: str) -> None:
    """A benchmark's markdown report: written to path (folders made) and printed."""
    text = text.rstrip("\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    print("\n" + text)
