"""Reliability over real HTTP on the "limits" app: API keys, SSRF refusals with remote image fetch
on, overload past small queue limits, and (last, since they break replicas) replica kills.

The app: tiny Qwen3-VL, api_keys, media.allow_remote_images, decode engine of 2 running + 2
waiting sequences, small Serve queues, two prefill replicas, request_timeout_s 60.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from popserve_testing import deploy, metric_value, wait_for_metric
from prometheus_client.parser import text_string_to_metric_families
from popserve_testing import server_config as make_config
from test_reliability import App, _png_url, assert_openai_error

APP = "limits"
KEYS = ["sk-alpha-7c1e", "sk-beta-93d2"]
AUTH = {"authorization": f"Bearer {KEYS[0]}"}
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def lim(ray_cluster, qwen_dir):
    from ray import serve

    cfg = make_config(
        qwen_dir, pop_off_prefill=False, api_keys=KEYS,
        engine={"max_running_seqs": 2, "max_seq_len": 1024, "max_waiting": 2},
        limits={"max_tokens_limit": 600, "max_tokens_default": 8, "request_timeout_s": REQUEST_TIMEOUT_S},
        media={"allow_remote_images": True, "fetch_timeout_s": 2.0},
        ingress={"max_ongoing_requests": 128, "max_queued_requests": 128},
        encoder={"max_ongoing_requests": 8, "max_queued_requests": 8},
        prefill={"num_replicas": 2, "max_ongoing_requests": 4, "max_queued_requests": 4},
        # Serve's queue counts requests still being assigned: 4 (a burst of the replica-kill tests)
        # arriving within milliseconds must not be dropped before decode has accepted the first.
        decode={"max_ongoing_requests": 6, "max_queued_requests": 4})
    app = App(APP, deploy(ray_cluster, APP, cfg), cfg.model_name(), headers=AUTH)
    yield app
    serve.delete(APP)


# ---- auth -------------------------------------------------------------------------------------
def test_api_keys(lim):
    body = lim.body("hello")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {KEYS[0]}x"},
                    {"authorization": KEYS[0]}, {"authorization": f"Basic {KEYS[0]}"}):
        r = httpx.post(lim.chat_url, json=body, headers=headers, timeout=30)
        assert_openai_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    # Checked before the body is read: no key, no parsing (not a 400 or 413).
    assert_openai_error(httpx.post(lim.chat_url, content=b"{garbage", timeout=30), 401, "invalid_api_key")
    assert_openai_error(httpx.post(lim.chat_url, content=b"x" * 3 * 2**20, timeout=30), 401)
    for key in KEYS:
        r = httpx.post(lim.chat_url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text
    assert_openai_error(httpx.get(f"{lim.base_url}/v1/models", timeout=30), 401)
    assert httpx.get(f"{lim.base_url}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"] == lim.model
    assert httpx.get(f"{lim.base_url}/health", timeout=30).status_code == 200  # probes stay open
    m = httpx.get(f"{lim.base_url}/metrics", timeout=30)  # open: protect_metrics is off here
    assert m.status_code == 200 and "ray_popserve_" in m.text
    wait_for_metric(lambda: httpx.get(f"{lim.base_url}/metrics", timeout=30).text, "ray_popserve_errors_total",
                    lambda n: n >= 7, status="401", code="invalid_api_key")


def test_metrics_add_up_over_replicas(lim):
    """The two prefill replicas count their own prompts, and /metrics has both, each under its
    replica: the sum is every prompt prefilled, which one replica's numbers per scrape were not."""
    def prompts(text):
        return {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "ray_popserve_prefill_prompts_total" and s.labels["stage"] == "prefill"}

    time.sleep(3)  # earlier tests' prompts exported (each replica every 1 s, collected every 1 s)
    start = lim.metrics()
    at_start = prompts(start)
    before, sent = sum(at_start.values()), 0
    served = lambda: {r for r, n in prompts(lim.metrics()).items() if n > at_start.get(r, 0)}
    while sent < 24 and (sent < 4 or len(served()) < 2):  # Serve picks the replica; go on until both served
        lim.answer(f"Count to {sent}", max_tokens=1)
        sent += 1
    text = wait_for_metric(lim.metrics, "ray_popserve_prefill_prompts_total", lambda n: n >= before + sent,
                           stage="prefill")
    assert metric_value(text, "ray_popserve_prefill_prompts_total", stage="prefill") == before + sent
    assert len(prompts(text)) == 2 and all(n > 0 for n in prompts(text).values()), prompts(text)
    # The decode replica counted the same prompts' KV handoffs; gauges are per replica too.
    assert {s.labels["replica"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "ray_popserve_stage_queue_depth" and s.labels["stage"] == "prefill"} == set(prompts(text))


def test_prompts_that_start_alike_go_to_the_replica_that_has_them_cached(lim, qwen_dir):
    """Questions after one long lead-in, one at a time, over the two prefill replicas: each after
    the first finds the whole shared start in the cache, because the prefix-affinity router sends
    them all to one replica (Serve's default picks either, and half would miss). Prompts that start
    differently still spread over both replicas."""
    from popserve.models.prefix_cache import BLOCK_TOKENS, shared_blocks_tokens
    from popserve.models.prompt import PromptBuilder

    def per_replica(text, name):
        return {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels["stage"] == "prefill"}

    lead = "Before answering, recall the museum tour of the old harbour and its ships. " * 3
    builder = PromptBuilder(qwen_dir)
    texts = [f"{lead}Question {i}: which ship was the oldest one?" for i in range(6)]
    ids = [builder.build([{"role": "user", "content": t}]).input_ids[:-1] for t in texts]
    shared = shared_blocks_tokens(ids[0], ids[1])
    assert shared >= 2 * BLOCK_TOKENS

    time.sleep(3)  # earlier tests' numbers exported and collected
    start = lim.metrics()
    hits0 = sum(per_replica(start, "ray_popserve_prefix_cache_hit_tokens_total").values())
    prompts0 = per_replica(start, "ray_popserve_prefill_prompts_total")
    for t in texts:
        lim.answer(t, max_tokens=1)
    text = wait_for_metric(lim.metrics, "ray_popserve_prefill_prompts_total",
                           lambda n: n >= sum(prompts0.values()) + len(texts), stage="prefill")
    hits = sum(per_replica(text, "ray_popserve_prefix_cache_hit_tokens_total").values()) - hits0
    assert hits == (len(texts) - 1) * shared
    grew = {r for r, n in per_replica(text, "ray_popserve_prefill_prompts_total").items() if n > prompts0.get(r, 0)}
    assert len(grew) == 1  # all on one replica

    # Sixteen different starts: all on one replica would happen with probability 2^-15.
    prompts1 = per_replica(text, "ray_popserve_prefill_prompts_total")
    for i in range(16):
        lim.answer(f"{i} " * 3 + lead, max_tokens=1)
    text = wait_for_metric(lim.metrics, "ray_popserve_prefill_prompts_total",
                           lambda n: n >= sum(prompts1.values()) + 16, stage="prefill")
    grew = {r for r, n in per_replica(text, "ray_popserve_prefill_prompts_total").items() if n > prompts1.get(r, 0)}
    assert len(grew) == 2


# ---- SSRF over HTTP (remote fetch on) ---------------------------------------------------------
class _Counting(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_ssrf_targets_are_refused_by_the_server(lim, ray_cluster, monkeypatch):
    """Loopback (a live server the test runs, which must see no request), private, link-local,
    cloud-metadata and mapped addresses, metadata hostnames and non-http schemes: all refused
    fast, before any connection. Each URL is first checked in-process with DNS and sockets
    guarded, so nothing is ever sent to a non-loopback address even if the check were broken."""
    from popserve.service import media
    from popserve.service.config import Media

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    urls = [
        f"http://127.0.0.1:{port}/cat.png", f"http://127.0.0.1:{ray_cluster}/{APP}/health",
        f"http://[::1]:{port}/cat.png", f"http://[::ffff:127.0.0.1]:{port}/cat.png", f"http://0.0.0.0:{port}/x",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/", "http://100.100.100.200/latest/meta-data/",
        "http://10.0.0.1/cat.png", "http://172.16.0.1/cat.png", "http://192.168.1.1/cat.png",
        "http://[64:ff9b::a9fe:a9fe]/latest/", "http://metadata.google.internal/computeMetadata/v1/",
        "file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/_x",
    ]

    async def numeric_only(host, port):
        ipaddress.ip_address(host)  # raises for names: no DNS from this check
        return [host]

    monkeypatch.setattr(media, "resolve_host", numeric_only)
    for url in urls:
        with pytest.raises(Exception) as info:
            asyncio.run(media.check_url(url, Media(allow_remote_images=True)))
        assert getattr(info.value, "status", None) == 400, (url, info.value)
    monkeypatch.undo()
    try:
        for url in urls:
            body = lim.body("what is this?", images=[url])
            t0 = time.monotonic()
            r = lim.post(body, timeout=30)
            err = assert_openai_error(r, 400)
            assert err["code"] in ("host_not_allowed", "invalid_image_url"), (url, err)
            assert time.monotonic() - t0 < 5, url
        assert _Counting.hits == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert lim.answer("still serving?", images=[_png_url()])


# ---- overload ---------------------------------------------------------------------------------
def _prompts():
    return [f"Question {i}: " + " ".join(["tell me about the sea"] * (1 + i)) for i in range(6)]


async def _flood(lim: App, prompts, copies: int, max_tokens: int):
    async def one(client, text, stream):
        body = lim.body(text, max_tokens=max_tokens, stream=stream)
        t0 = time.monotonic()
        r = await client.post(lim.chat_url, json=body, headers=AUTH)
        elapsed = time.monotonic() - t0
        text_out = None
        if r.status_code == 200:
            if stream:
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]", r.text[-400:]
                text_out = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                                   for e in events[:-1] if json.loads(e).get("choices"))
            else:
                text_out = r.json()["choices"][0]["message"]["content"]
        return text, r, elapsed, text_out

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        jobs = [one(client, p, k % 3 == 2) for k in range(copies) for p in prompts]
        return await asyncio.gather(*jobs)


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def test_overload_is_rejected_fast_and_accepted_requests_are_exact(lim):
    prompts = _prompts()
    alone = {p: lim.answer(p, max_tokens=24) for p in prompts}
    assert len(set(alone.values())) > 1
    pids = {s: lim.pid(s) for s in ("Ingress", "Decode")}
    rss = []
    totals = {"ok": 0, "rejected": 0}
    for wave in range(3):
        results = asyncio.run(_flood(lim, prompts, copies=6, max_tokens=24))
        ok = [(p, t, e) for p, r, e, t in results if r.status_code == 200]
        rejected = [(r, e) for _, r, e, _ in results if r.status_code != 200]
        for p, text, _ in ok:
            assert text == alone[p], (p, text, alone[p])
        for r, elapsed in rejected:
            err = assert_openai_error(r, r.status_code)
            assert r.status_code in (429, 503), r.text
            assert err["code"] == "overloaded", err
            assert int(r.headers["retry-after"]) >= 1
        slowest_rejection = max((e for _, e in rejected), default=0)
        assert slowest_rejection < 5.0, slowest_rejection
        assert len(ok) >= 4 and len(rejected) >= 6, (len(ok), len(rejected))
        totals["ok"] += len(ok)
        totals["rejected"] += len(rejected)
        rss.append({s: _rss(pid) for s, pid in pids.items()})
    for stage in pids:  # bounded queues: the third wave costs no more memory than the first
        grown = rss[2][stage] - rss[0][stage]
        assert grown < 64 * 2**20, f"{stage} RSS grew {grown / 2**20:.0f} MiB over two flood waves"
    wait_for_metric(lim.metrics, "ray_popserve_decode_running_sequences", lambda n: n == 0)
    assert lim.answer(prompts[0], max_tokens=24) == alone[prompts[0]]


# ---- replica failures (last: they kill replicas of this app) ----------------------------------
def _replica_actors(stage: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#{stage}#"))


def _kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _wait_until_serving(lim: App, text: str, limit: float = 180.0) -> str:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < limit:
        try:
            r = lim.post(lim.body(text, max_tokens=12), timeout=REQUEST_TIMEOUT_S * 2 + 10)
            if r.status_code == 200:
                return r.json()["choices"][0]["message"]["content"]
            last = r.text
            assert r.status_code in (503, 500) or r.status_code == 408, r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise AssertionError(f"the app did not recover within {limit}s: {last}")


def test_killing_decode_ends_running_streams_with_an_error_and_retries_waiting_requests(lim):
    """Two long streams fill the decode batch (2 slots), two more requests wait for a slot. The
    decode replica is killed: the streams end promptly with an SSE error event and no [DONE]; the
    waiting requests had no token yet, so the ingress retries them once, and they complete,
    exactly, on the replica Serve starts in its place."""
    text = "Tell me about the sea"
    before = lim.answer(text, max_tokens=12)
    from ray import serve

    [decode] = _replica_actors("Decode")
    decode_stats = serve.get_deployment_handle("Decode", app_name=APP).stats
    long_body = lim.body("Tell me a very long story about the sea", max_tokens=590, stream=True)

    async def scenario():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S * 3) as client:
            async def open_stream():
                r = await client.send(client.build_request("POST", lim.chat_url, json=long_body, headers=AUTH),
                                      stream=True)
                assert r.status_code == 200
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        return r, lines
                raise AssertionError("no first token")

            async def rest(r, lines):
                events = [line[6:] async for line in lines if line.startswith("data: ")]
                await r.aclose()
                return events, time.monotonic()

            streams = await asyncio.gather(open_stream(), open_stream())
            waiting = [asyncio.create_task(client.post(lim.chat_url, headers=AUTH, json=lim.body(text, max_tokens=12)))
                       for _ in range(2)]
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                if (await decode_stats.remote())["waiting"] == 2:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the two requests never queued in decode")
            _kill(decode)
            t_kill = time.monotonic()
            ended = await asyncio.gather(*(rest(*s) for s in streams))
            return t_kill, ended, await asyncio.gather(*waiting)

    t_kill, ended, waited = asyncio.run(scenario())
    for events, t_end in ended:
        assert events and "[DONE]" not in events, events[-3:]
        err = json.loads(events[-1])["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "replica_failed", err
        assert t_end - t_kill < 10.0, t_end - t_kill
    for r in waited:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == before
    assert _replica_actors("Decode") and _replica_actors("Decode") != [decode]
    assert _wait_until_serving(lim, text) == before
    # The dead replica's gauges leave /metrics (Ray's agent drops gauges no one sets any more):
    # the decode numbers are the new replica's alone, not the sum of a live and a dead one.
    [new] = [name.rsplit("#", 1)[1] for name in _replica_actors("Decode")]
    deadline = time.monotonic() + 30
    while {s.labels["replica"] for f in text_string_to_metric_families(lim.metrics()) for s in f.samples
           if s.name == "ray_popserve_decode_running_sequences"} != {new}:
        assert time.monotonic() < deadline, "the dead decode replica's gauges stayed in /metrics"
        time.sleep(0.5)


def test_killing_a_prefill_replica_is_retried_and_dead_handoffs_are_never_decoded(lim):
    from ray import serve

    text = "Tell me about the boy who lived near the sea"
    before = lim.answer(text, max_tokens=12)
    replicas = _replica_actors("Prefill")
    assert len(replicas) == 2, replicas
    decode = serve.get_deployment_handle("Decode", app_name=APP)
    handoffs_before = decode.stats.remote().result()["handoffs"]

    async def burst():  # the kill lands while the burst is being prefilled or routed
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S * 3) as client:
            jobs = [asyncio.create_task(client.post(lim.chat_url, headers=AUTH, json=lim.body(text, max_tokens=12)))
                    for _ in range(4)]
            await asyncio.sleep(0.05)
            _kill(replicas[0])
            return await asyncio.gather(*jobs)

    t0 = time.monotonic()
    results = asyncio.run(burst())
    assert time.monotonic() - t0 < REQUEST_TIMEOUT_S * 2
    ok = 0
    for r in results:
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"] == before
            ok += 1
        else:  # or a clean failure, never a hang or a bare 500
            assert_openai_error(r, 503, "replica_failed")
            assert int(r.headers["retry-after"]) >= 1
    assert ok == len(results), [r.status_code for r in results]  # prefill is retried on the live replica
    handoffs = decode.stats.remote().result()["handoffs"] - handoffs_before
    assert handoffs == ok  # only handoffs of live producers reached the decode pool
    assert _wait_until_serving(lim, text) == before
