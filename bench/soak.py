"""Soak test: N concurrent clients against a running popserve for a bounded time.

    python bench/soak.py --url http://127.0.0.1:8000 --model NAME --clients 4 --duration 60 \
        [--api-key KEY] [--app APP --ray-address auto] [--json out.json]

Each client loops over a fixed mix of requests (text and image, streaming and not, small
max_tokens) until the deadline, then the run stops by itself. The report: requests done, errors
by type (HTTP status and OpenAI error code, or the exception class), p50/p99 latency, and each
replica's memory (RSS sampled every second, its peak, and the kernel's high-water mark VmHWM),
found through each stage's stats() handle call ({"pid": ...}, when connected to Ray) and the
replica process titles (`ray::ServeReplica:<app>:<Deployment>`) on this machine.

Loopback only: the URL must point at 127.0.0.0/8 or ::1 (or "localhost"); clients are capped at
64 and the duration at one hour.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Optional
from urllib.parse import urlsplit

import httpx

MAX_CLIENTS = 64
MAX_DURATION_S = 3600.0
STAGES = ("Ingress", "VisionEncoder", "Prefill", "PrefillFull", "Decode")


def _loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"soak: {url!r} is not a loopback URL (127.0.0.0/8, ::1, localhost); refusing")


def _image_url(seed: int) -> str:
    from PIL import Image

    img = Image.new("RGB", (64 + 8 * seed, 48), ((37 * seed) % 256, 120, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_mix(model: str, max_tokens: int) -> list[dict]:
    """The bodies every client cycles through (shifted by its index)."""
    images = [_image_url(i) for i in range(3)]
    bodies = []
    for i in range(8):
        text = f"Soak request {i}: " + " ".join(["tell me about the sea"] * (1 + i % 4))
        content: object = text
        if i % 3 == 1:
            content = [{"type": "image_url", "image_url": {"url": images[i % 3]}}, {"type": "text", "text": text}]
        bodies.append({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0 if i % 2 else 0.7, "seed": i,
                       "stream": i % 4 == 3})
    return bodies


# ---- replica memory -------------------------------------------------------------------------
def _vmhwm_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def replica_pids(app: Optional[str]) -> dict[str, int]:
    """{replica label: pid}: stats() of each stage over Serve handles when Ray is connected,
    plus the replica process titles on this machine (which also finds the ingress)."""
    found: dict[str, int] = {}
    if app:
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                for stage in STAGES[1:]:
                    try:
                        stats = serve.get_deployment_handle(stage, app_name=app).stats.remote().result(
                            timeout_s=10)
                        found[stage] = int(stats["pid"])
                    except Exception:
                        pass
        except ImportError:
            pass
    try:
        import psutil
    except ImportError:
        return found
    known = set(found.values())
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info.get("cmdline") or [])
        if "ServeReplica:" not in title:
            continue
        tail = title.split("ServeReplica:", 1)[1].split()[0]  # <app>:<Deployment>[.method]
        parts = tail.split(":")
        if len(parts) < 2 or (app and parts[0] != app):
            continue
        stage = parts[1].split(".")[0]
        if proc.info["pid"] in known:
            continue
        label = stage if stage not in found else f"{stage}@{proc.info['pid']}"
        if not app:
            label = f"{parts[0]}:{label}"
        found[label] = proc.info["pid"]
        known.add(proc.info["pid"])
    return found


class MemorySampler:
    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak: dict[str, int] = {}

    def sample(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        for label, pid in self.pids.items():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except Exception:
                continue
            self.peak[label] = max(self.peak.get(label, 0), rss)

    async def run(self, stop: asyncio.Event, period: float = 1.0) -> None:
        while not stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass
        self.sample()

    def report(self) -> dict[str, dict]:
        out = {}
        for label, pid in sorted(self.pids.items()):
            hwm = _vmhwm_bytes(pid)
            out[label] = {"pid": pid, "peak_rss_mb": round(self.peak.get(label, 0) / 2**20, 1),
                          "vmhwm_mb": round(hwm / 2**20, 1) if hwm else None}
        return out


# ---- the clients ----------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Optional[str]:
    """None on success, else the error type."""
    try:
        if body.get("stream"):
            async with client.stream("POST", url, json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _http_error(r)
                done = False
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                        elif '"error"' in data and data.startswith('{"error"'):
                            return f"stream:{json.loads(data)['error'].get('code')}"
                return None if done else "stream:no_done"
        r = await client.post(url, json=body, headers=headers)
        if r.status_code != 200:
            return _http_error(r)
        if not r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] == 0:
            return "empty_completion"
        return None
    except httpx.HTTPError as exc:
        return f"client:{type(exc).__name__}"


def _http_error(r: httpx.Response) -> str:
    try:
        code = r.json()["error"].get("code")
    except Exception:
        code = None
    return f"{r.status_code}:{code}"


async def soak(url: str, model: str, clients: int = 4, duration: float = 20.0, max_tokens: int = 8,
               api_key: Optional[str] = None, app: Optional[str] = None, timeout: float = 120.0) -> dict:
    _loopback_only(url)
    clients = max(1, min(int(clients), MAX_CLIENTS))
    duration = max(0.1, min(float(duration), MAX_DURATION_S))
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    bodies = request_mix(model, max_tokens)
    latencies: list[float] = []
    errors: Counter = Counter()
    pids = await asyncio.to_thread(replica_pids, app)
    sampler = MemorySampler(pids)
    stop = asyncio.Event()
    t_start = time.monotonic()
    deadline = t_start + duration

    async def client_loop(idx: int, client: httpx.AsyncClient) -> None:
        i = idx
        while time.monotonic() < deadline:
            body = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            err = await _one(client, endpoint, body, headers)
            if err is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[err] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        mem_task = asyncio.create_task(sampler.run(stop))
        try:
            # Hard stop: the deadline plus one request timeout, whatever the server does.
            await asyncio.wait_for(asyncio.gather(*(client_loop(i, client) for i in range(clients))),
                                   duration + timeout)
        except asyncio.TimeoutError:
            errors["client:hard_stop"] += 1
        finally:
            stop.set()
            await mem_task
    elapsed = time.monotonic() - t_start
    lat = sorted(latencies)

    def pct(p: float) -> Optional[float]:
        if not lat:
            return None
        return round(lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))], 4)

    done = len(lat)
    return {
        "url": url, "clients": clients, "duration_s": round(elapsed, 2),
        "requests_ok": done, "requests_failed": sum(errors.values()),
        "requests_per_s": round(done / elapsed, 2) if elapsed else 0.0,
        "errors": dict(errors),
        "latency_s": {"p50": pct(50), "p99": pct(99), "mean": round(statistics.fmean(lat), 4) if lat else None,
                      "max": round(lat[-1], 4) if lat else None},
        "replica_memory": sampler.report(),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="base URL of the app, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="served model name")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout, seconds")
    ap.add_argument("--api-key", default=os.environ.get("POPSERVE_API_KEY"))
    ap.add_argument("--app", default=None, help="Serve app name, to find its replica processes")
    ap.add_argument("--ray-address", default=None, help="connect to Ray (e.g. auto) to ask stages for pids")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    report = asyncio.run(soak(args.url, args.model, args.clients, args.duration, args.max_tokens, args.api_key,
                              args.app, args.timeout))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(1 if rep["requests_failed"] else 0)
