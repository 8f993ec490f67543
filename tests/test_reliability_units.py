"""Reliability cases proved in-process, without Ray: SSRF defences of the remote image fetch
(against real HTTP servers on 127.0.0.x), API-key policy, image limits and the decode queue bound.

No traffic leaves loopback: every hostname used here resolves through a fake resolver, and
`socket.getaddrinfo` plus `httpx.AsyncClient.send` are guarded so that a lookup of a real name or
a request to a non-loopback address fails the test instead of reaching the network.
"""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from popserve.service import media
from popserve.service.config import Limits, Media
from popserve.service.errors import BadRequest, Overloaded, PayloadTooLarge, ServeError, Unauthorized


def png_bytes(size=(32, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ---- guards: nothing resolves or connects beyond loopback -----------------------------------------
FAKE_DNS: dict[str, list[str]] = {}
_real_getaddrinfo = socket.getaddrinfo


def _numeric(host) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
        return True
    except ValueError:
        return False


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _numeric(host if isinstance(host, str) else host.decode()):
        raise AssertionError(f"real DNS lookup attempted for {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


async def _fake_resolve(host: str, port: int) -> list[str]:
    if host in FAKE_DNS:
        return list(FAKE_DNS[host])
    if _numeric(host):
        return [str(ipaddress.ip_address(host))]
    raise socket.gaierror(f"fake resolver: unknown host {host!r}")


SENT: list[str] = []


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    FAKE_DNS.clear()
    SENT.clear()
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    monkeypatch.setattr(media, "resolve_host", _fake_resolve)
    real_send = httpx.AsyncClient.send

    async def guarded_send(self, request, *args, **kwargs):
        SENT.append(str(request.url))
        if not ipaddress.ip_address(request.url.host).is_loopback:
            raise AssertionError(f"connection to a non-loopback address attempted: {request.url}")
        return await real_send(self, request, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", guarded_send)
    yield


@pytest.fixture
def loopback_is_public(monkeypatch):
    """127.0.0.2 (only) counts as a public address, so a test server there can be fetched."""
    real = media.is_public_address

    def classify(addr: str) -> bool:
        return addr == "127.0.0.2" or real(addr)

    monkeypatch.setattr(media, "is_public_address", classify)


# ---- a small HTTP server on 127.0.0.x -----------------------------------------------------------
class LocalServer:
    """Routes: path -> handler(req) where req is the BaseHTTPRequestHandler. Records every request."""

    def __init__(self, host: str, routes: dict):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.hits.append((self.path, self.headers.get("host")))
                fn = routes.get(self.path.split("?")[0])
                if fn is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                try:
                    fn(self)
                except (BrokenPipeError, ConnectionResetError):
                    server.aborted += 1

        self.hits: list[tuple[str, str]] = []
        self.aborted = 0
        self.written = 0
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def local_servers():
    made = []

    def make(host: str, routes: dict) -> LocalServer:
        s = LocalServer(host, routes)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def send_bytes(data: bytes, ctype="image/png"):
    def fn(h):
        h.send_response(200)
        h.send_header("content-type", ctype)
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return fn


def redirect(location: str, code=302):
    def fn(h):
        h.send_response(code)
        h.send_header("location", location)
        h.send_header("content-length", "0")
        h.end_headers()
    return fn


MEDIA = Media(allow_remote_images=True, fetch_timeout_s=2.0, max_redirects=3)
LIMITS = Limits(max_image_bytes=256 * 1024)


def fetch(url, m=MEDIA, lim=LIMITS):
    return asyncio.run(media.fetch_image(url, m, lim))


def refused(url, m=MEDIA, lim=LIMITS) -> ServeError:
    with pytest.raises(ServeError) as info:
        fetch(url, m, lim)
    assert 400 <= info.value.status < 500
    return info.value


# ---- address classification ----------------------------------------------------------------------
@pytest.mark.parametrize("addr", [
    "127.0.0.1", "127.0.0.2", "::1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254",
    "fe80::1", "fd00:ec2::254", "100.100.100.200", "0.0.0.0", "::", "224.0.0.1", "255.255.255.255",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:5",
    "2002:a9fe:a9fe::1", "2002:7f00:1::1", "fe80::1%eth0", "198.18.0.1", "240.0.0.1",
])
def test_non_public_addresses_are_refused(addr):
    assert not media.is_public_address(addr)


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34",
                                  "64:ff9b::808:808"])
def test_public_addresses_pass(addr):
    assert media.is_public_address(addr)  # pure classification: nothing is contacted


# ---- refusal after DNS resolution, before any connection -----------------------------------------
@pytest.mark.parametrize("name,answers", [
    ("rebind.test", ["10.1.2.3"]),
    ("home.test", ["192.168.0.10"]),
    ("meta.test", ["169.254.169.254"]),
    ("loop.test", ["127.0.0.1"]),
    ("v6loop.test", ["::1"]),
    ("nat64meta.test", ["64:ff9b::a9fe:a9fe"]),
    ("mixed.test", ["93.184.216.34", "10.0.0.1"]),  # one private answer is enough to refuse
])
def test_hostnames_resolving_to_private_addresses_are_refused_before_connecting(name, answers):
    FAKE_DNS[name] = answers
    err = refused(f"http://{name}/cat.png")
    assert err.code == "host_not_allowed"
    assert SENT == []  # refused after resolution, before any connection


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://[::1]/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.png", "http://192.168.1.1/x.png", "http://[::ffff:10.0.0.1]/x.png",
    "http://metadata.google.internal/computeMetadata/v1/", "http://metadata/x", "http://instance-data/x",
])
def test_private_and_metadata_urls_are_refused(url):
    assert refused(url).code == "host_not_allowed"
    assert SENT == []


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://93.184.216.34/x.png", "gopher://93.184.216.34:70/_x", "dict://x:11211/",
    "javascript:alert(1)", "http:///nohost.png", "http://user:pw@93.184.216.34/x.png",
    "http://93.184.216.34:99999/x.png",
])
def test_other_schemes_and_malformed_urls_are_refused(url):
    assert refused(url).code == "invalid_image_url"
    assert SENT == []


def test_allowlist():
    m = Media(allow_remote_images=True, allowed_hosts=["images.example"], fetch_timeout_s=2)
    FAKE_DNS["other.test"] = ["93.184.216.34"]
    assert refused("http://other.test/x.png", m).code == "host_not_allowed"
    FAKE_DNS["images.example"] = ["10.0.0.1"]  # an allowed name is still checked after resolution
    assert refused("http://images.example/x.png", m).code == "host_not_allowed"
    assert SENT == []


def test_remote_fetch_off_by_default():
    with pytest.raises(BadRequest) as info:
        asyncio.run(media.load_image("http://93.184.216.34/x.png", Media(), LIMITS))
    assert info.value.code == "remote_images_disabled" and SENT == []


# ---- against real local servers (127.0.0.2 counts as public) ------------------------------------------
def test_fetch_pins_the_vetted_address_and_keeps_the_host_header(local_servers, loopback_is_public, monkeypatch):
    """One lookup per hop; the connection goes to the address that was checked (DNS rebinding
    cannot swap it), with the original Host header."""
    img = png_bytes()
    s = local_servers("127.0.0.2", {"/cat.png": send_bytes(img)})
    answers = iter([["127.0.0.2"], ["127.0.0.1"], ["127.0.0.1"]])  # a rebinding resolver

    async def rebinding(host, port):
        assert host == "img.test"
        return next(answers)

    monkeypatch.setattr(media, "resolve_host", rebinding)
    loaded = fetch(f"http://img.test:{s.port}/cat.png")
    assert loaded.image.size == (32, 24)
    assert s.hits == [("/cat.png", f"img.test:{s.port}")]
    assert SENT == [f"http://127.0.0.2:{s.port}/cat.png"]  # no name left for a second lookup


@pytest.mark.parametrize("target", ["loopback", "metadata", "metadata-name", "file", "private-name"])
def test_redirects_are_checked_on_every_hop(local_servers, loopback_is_public, target):
    inner = local_servers("127.0.0.1", {"/secret": send_bytes(png_bytes())})  # must never be reached
    FAKE_DNS["meta.test"] = ["169.254.169.254"]
    FAKE_DNS["corp.test"] = ["10.20.30.40"]
    location = {"loopback": inner.url("/secret"), "metadata": "http://169.254.169.254/latest/meta-data/",
                "metadata-name": "http://meta.test/latest/meta-data/", "file": "file:///etc/passwd",
                "private-name": "http://corp.test/img.png"}[target]
    outer = local_servers("127.0.0.2", {"/start": redirect(location)})
    err = refused(outer.url("/start"))
    assert err.code in ("host_not_allowed", "invalid_image_url")
    assert outer.hits and not inner.hits
    assert all(u.startswith("http://127.0.0.2:") for u in SENT)  # nothing but the first hop went out


def test_public_redirect_chain_is_followed_then_capped(local_servers, loopback_is_public):
    img = png_bytes()
    routes = {"/a": redirect("/b"), "/b": redirect("/c"), "/c": send_bytes(img),
              "/loop": redirect("/loop")}
    s2 = local_servers("127.0.0.2", routes)
    assert fetch(s2.url("/a")).image.size == (32, 24)
    assert refused(s2.url("/loop")).code == "image_fetch_failed"  # max_redirects
    assert len([h for h in s2.hits if h[0] == "/loop"]) == MEDIA.max_redirects + 1


def test_oversized_body_is_cut_at_the_cap(local_servers, loopback_is_public):
    total = 64 * 2**20
    chunk = b"\0" * 65536

    def endless(h):  # no Content-Length: the client must count
        h.send_response(200)
        h.send_header("content-type", "image/png")
        h.send_header("connection", "close")
        h.end_headers()
        for _ in range(total // len(chunk)):
            h.wfile.write(chunk)
            s.written += len(chunk)

    def declared(h):  # an honest Content-Length over the cap: refused before the body is read
        h.send_response(200)
        h.send_header("content-length", str(total))
        h.end_headers()
        time.sleep(1.5)

    s = local_servers("127.0.0.2", {"/big": endless, "/declared": declared})
    t0 = time.monotonic()
    err = refused(s.url("/big"))
    assert isinstance(err, PayloadTooLarge) and err.code == "image_too_large"
    deadline = time.monotonic() + 5
    while s.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.aborted == 1, "the server finished sending: the body was not cut"
    assert s.written < total // 4
    t0 = time.monotonic()
    err = refused(s.url("/declared"))
    assert err.code == "image_too_large" and time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("mode", ["slow-body", "slow-headers", "slow-redirects"])
def test_slow_servers_hit_the_fetch_deadline(local_servers, loopback_is_public, mode):
    def trickle(h):
        h.send_response(200)
        h.send_header("content-length", "100000")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b"\x89")
            h.wfile.flush()
            time.sleep(0.3)  # each read is quick: only a deadline over the whole fetch catches it

    def late(h):
        time.sleep(5)
        send_bytes(png_bytes())(h)

    def slow_hop(n):
        def fn(h):
            time.sleep(0.6)
            redirect(f"/hop{n + 1}")(h)
        return fn

    routes = {"/trickle": trickle, "/late": late, **{f"/hop{i}": slow_hop(i) for i in range(4)}}
    s = local_servers("127.0.0.2", routes)
    path = {"slow-body": "/trickle", "slow-headers": "/late", "slow-redirects": "/hop0"}[mode]
    m = Media(allow_remote_images=True, fetch_timeout_s=1.0, max_redirects=3)
    t0 = time.monotonic()
    err = refused(s.url(path), m)
    elapsed = time.monotonic() - t0
    assert err.code == "image_fetch_timeout", err.message
    assert elapsed < 1.8, elapsed  # one deadline for the whole fetch, not one per read or per hop


# ---- images --------------------------------------------------------------------------------------
def test_images_over_the_pixel_cap_are_downscaled_keeping_aspect():
    lim = Limits(max_image_pixels=256 * 256)
    data = png_bytes((1600, 1200))
    loaded = media.decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(), lim)
    w, h = loaded.image.size
    assert w * h <= lim.max_image_pixels and abs(w / h - 4 / 3) < 0.02 and w >= 290


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white(mode):
    """As qwen-vl-utils does: transparent pixels become white, whatever colour they hold (a bare
    convert("RGB") shows it: here red, black or palette entry 0); opaque ones keep theirs."""
    img = {"RGBA": lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)),
           "LA": lambda: Image.new("LA", (4, 4), (0, 0)),
           "P": lambda: Image.new("P", (4, 4), 0)}[mode]()
    img.putpixel((0, 0), {"RGBA": (0, 0, 255, 255), "LA": (80, 255), "P": 1}[mode])
    if mode == "P":
        img.putpalette([200, 10, 10, 0, 0, 255] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 0} if mode == "P" else {}))
    loaded = media.decode_data_url("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), Limits())
    assert loaded.image.mode == "RGB" and loaded.image.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.image.getpixel((0, 0)) == {"RGBA": (0, 0, 255), "LA": (80, 80, 80), "P": (0, 0, 255)}[mode]


def test_only_the_named_image_formats_are_decoded():
    """PNG, JPEG, WebP, GIF and BMP decode, whatever the data URL's type says; TIFF, PSD and
    Pillow's other formats are refused as not supported (each is more decoder code that untrusted
    bytes could reach)."""
    for fmt in media.IMAGE_FORMATS + ("TIFF", "PPM", "ICO", "TGA"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, fmt)
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        if fmt in media.IMAGE_FORMATS:
            assert media.decode_data_url(url, Limits()).image.size == (8, 6), fmt
        else:
            with pytest.raises(BadRequest, match="not a supported image") as info:
                media.decode_data_url(url, Limits())
            assert info.value.code == "invalid_image", fmt


def test_bomb_header_is_refused_before_decoding():
    from test_reliability import png_bomb

    data = png_bomb(20000, 20000)
    lim = Limits(max_image_bytes=len(data) + 1)
    t0 = time.monotonic()
    with pytest.raises(BadRequest) as info:
        media.decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(), lim)
    assert info.value.code == "image_too_many_pixels" and time.monotonic() - t0 < 1.0


# ---- API keys ------------------------------------------------------------------------------------
def test_api_key_policy():
    from popserve.service.ingress import api_keys, check_api_key

    keys = api_keys(["sk-a"], {"POPSERVE_API_KEYS": " sk-b , ,sk-c"})
    assert keys == ["sk-a", "sk-b", "sk-c"]
    assert api_keys([], {}) == []
    for good in ("Bearer sk-a", "bearer sk-b", "Bearer sk-c"):
        check_api_key(keys, "/app/v1/chat/completions", good, False)
    for bad in ("", "sk-a", "Bearer", "Bearer ", "Bearer sk-", "Bearer sk-a2", "Basic sk-a", "Bearer SK-A"):
        with pytest.raises(Unauthorized) as info:
            check_api_key(keys, "/app/v1/chat/completions", bad, False)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
    check_api_key(keys, "/app/health", "", True)  # probes stay open
    check_api_key(keys, "/app/metrics", "", False)  # open unless protect_metrics
    with pytest.raises(Unauthorized):
        check_api_key(keys, "/app/metrics", "", True)
    check_api_key(keys, "/app/metrics", "Bearer sk-c", True)
    check_api_key([], "/app/v1/chat/completions", "", True)  # no keys: no auth


# ---- decode queue bound --------------------------------------------------------------------------
class _FakeHandoff:
    num_tokens = prompt_tokens = 4
    cached_tokens = 0
    nbytes = 0
    created_at = 0.0


class _FakeDecoder:
    """Slots and steps like FullDecoder; each step takes 20 ms in the worker thread."""

    def __init__(self, max_seqs):
        from popserve.models.decoder import StepOutput

        self.StepOutput = StepOutput
        self.max_seqs, self.max_seq_len = max_seqs, 1024
        self.running: dict[int, int] = {}
        self.next_id = 0
        self.peak = 0
        self.kv_bytes_in_use = self.kv_pool_bytes = 0

    @property
    def num_running(self):
        return len(self.running)

    def check(self, handoff):
        pass

    def can_admit(self, n, m, count=1):
        return len(self.running) + count <= self.max_seqs

    def add(self, handoff, params, stop):
        assert len(self.running) < self.max_seqs
        self.next_id += 1
        self.running[self.next_id] = params.max_new_tokens
        self.peak = max(self.peak, len(self.running))
        return self.next_id

    def remove(self, seq_id):
        return self.running.pop(seq_id, None) is not None

    def step(self):
        time.sleep(0.02)
        out = []
        for sid in list(self.running):
            self.running[sid] -= 1
            done = self.running[sid] == 0
            out.append(self.StepOutput(sid, 7, "length" if done else None))
            if done:
                del self.running[sid]
        return out


def test_decode_admission_is_bounded_under_a_burst():
    """A burst that lands between two steps cannot grow the waiting queue past
    max_waiting + free slots; the rest get Overloaded (503) at once, the accepted all finish."""
    from popserve.models.sampling import SamplingParams
    from popserve.service.engine.scheduler import DecodeScheduler

    async def scenario():
        dec = _FakeDecoder(max_seqs=2)
        sched = DecodeScheduler(dec, (), max_waiting=2)
        peak_waiting = 0

        async def one():
            nonlocal peak_waiting
            toks = []
            try:
                async for items in sched.generate(_FakeHandoff(), SamplingParams(max_new_tokens=3)):
                    peak_waiting = max(peak_waiting, len(sched.waiting))
                    toks += items
            except Overloaded as exc:
                assert exc.status == 503 and exc.retry_after
                return "rejected"
            assert len(toks) == 3 and toks[-1][1] == "length"
            return "done"

        results = await asyncio.gather(*(one() for _ in range(40)))
        return results, dec.peak, sched

    results, peak, sched = asyncio.run(scenario())
    assert results.count("done") == 4, results  # 2 slots + 2 waiting
    assert results.count("rejected") == 36
    assert peak == 2 and sched.stats()["running"] == 0 and sched.stats()["waiting"] == 0


def test_every_stage_queue_is_bounded_and_says_when_to_retry():
    """Serve rejects past max_queued_requests at every stage; for the ingress that rejection is the
    HTTP proxy's own 503, which carries Retry-After through backpressure_config."""
    from popserve.service.config import ServeConfig
    from popserve.service.deployments.common import deployment_options

    cfg = ServeConfig()
    for name, settings in (("Ingress", cfg.ingress), ("VisionEncoder", cfg.encoder), ("Prefill", cfg.prefill),
                           ("Decode", cfg.decode)):
        opts = deployment_options(name, settings, cfg)
        assert 0 < opts["max_queued_requests"] <= 1024 and opts["max_ongoing_requests"] >= 1, (name, opts)
        assert opts["backpressure_config"]["retry_after_s"] >= 1, (name, opts)
    assert 0 < cfg.engine.max_waiting <= 1024 and cfg.engine.max_running_seqs >= 1


def test_decode_counts_requests_in_prefill_and_turns_them_away_before_prefilling():
    """Decode asks for a request's prefill itself: a request whose KV is still being prefilled holds
    a place in decode's bound, and a request that finds decode full is refused before its prefill
    starts (no prefill work for a request that would get a 503 anyway). Decode also knows, when it
    asks, whether the request will wait for a slot."""
    from popserve.models.sampling import SamplingParams
    from popserve.service.engine.scheduler import DecodeScheduler

    async def scenario():
        sched = DecodeScheduler(_FakeDecoder(max_seqs=2), (), max_waiting=2)
        started, gate = 0, asyncio.Event()

        async def prefill():  # as DecodeStage._prefill, which asks slots_spoken_for() first
            nonlocal started
            started += 1
            will_wait.append(sched.slots_spoken_for())
            await gate.wait()
            return _FakeHandoff()

        async def one():
            try:
                return [t async for items in sched.generate(prefill(), SamplingParams(max_new_tokens=3)) for t in items]
            except Overloaded:
                return "rejected"

        tasks = [asyncio.create_task(one()) for _ in range(10)]
        await asyncio.sleep(0.05)  # every request has asked; the accepted ones wait on their prefill
        in_prefill = sched.stats()["prefilling"]
        gate.set()
        return await asyncio.gather(*tasks), started, in_prefill, sched.stats()

    will_wait = []
    results, started, in_prefill, stats = asyncio.run(scenario())
    assert results.count("rejected") == 6 and started == 4 and in_prefill == 4, (results, started, in_prefill)
    # The first two fill the two slots the moment their KV arrives (so on a GPU it may come by CUDA
    # IPC); the next two will wait for a slot (so their KV waits in host memory: service/handoff.py).
    assert will_wait == [False, False, True, True]
    assert all(len(r) == 3 for r in results if r != "rejected")
    assert stats["prefilling"] == 0 and stats["waiting"] == 0 and stats["running"] == 0


def test_decode_counts_the_slots_of_n_choices_when_it_asks_for_a_handoff():
    """A request of n choices will take n slots: with 4 slots, one of 3 choices in prefill leaves
    room for one more sequence, so a request of 2 choices asked for next will wait for a slot."""
    from popserve.models.sampling import SamplingParams
    from popserve.service.engine.scheduler import DecodeScheduler

    async def scenario():
        sched = DecodeScheduler(_FakeDecoder(max_seqs=4), (), max_waiting=4)
        gate = asyncio.Event()

        async def prefill():
            will_wait.append(sched.slots_spoken_for())
            await gate.wait()
            return _FakeHandoff()

        async def one(n):
            return [t async for items in sched.generate(prefill(), SamplingParams(max_new_tokens=2), n) for t in items]

        first = asyncio.create_task(one(3))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(one(2))
        await asyncio.sleep(0.01)
        gate.set()
        return [len(r) for r in await asyncio.gather(first, second)]

    will_wait = []
    assert asyncio.run(scenario()) == [6, 4]
    assert will_wait == [False, True]


def test_a_failing_scheduler_iteration_fails_its_requests_and_decode_keeps_serving():
    """A bug in decode's bookkeeping (here can_admit raising once) ends the requests it holds with
    an error instead of leaving them waiting forever, and the next request is served."""
    from popserve.models.sampling import SamplingParams
    from popserve.service.engine.scheduler import DecodeScheduler
    from popserve.service.errors import ServeError

    class Flaky(_FakeDecoder):
        broken = True

        def can_admit(self, n, m, count=1):
            if self.broken:
                self.broken = False
                raise RuntimeError("bookkeeping bug")
            return super().can_admit(n, m, count)

    async def scenario():
        sched = DecodeScheduler(Flaky(max_seqs=2), (), max_waiting=2)

        async def one():
            return [t async for items in sched.generate(_FakeHandoff(), SamplingParams(max_new_tokens=3)) for t in items]

        with pytest.raises(ServeError, match="bookkeeping bug"):
            await asyncio.wait_for(one(), 5)
        return len(await asyncio.wait_for(one(), 5)), sched.stats()

    served, stats = asyncio.run(scenario())
    assert served == 3 and stats["running"] == 0 and stats["waiting"] == 0


def test_a_dead_replica_is_retried_and_nothing_else():
    """Ingress (the whole request) and Decode (the prefill it asks for) share this retry."""
    import time

    from ray.exceptions import ActorDiedError

    from popserve.service.errors import REPLICA_RETRIES, BadRequest, retry_replica_failures

    def flaky(failures: list[BaseException]):
        calls = []

        async def attempt():
            calls.append(time.monotonic())
            if len(calls) <= len(failures):
                raise failures[len(calls) - 1]
            return "ok"
        return attempt, calls

    attempt, calls = flaky([ActorDiedError()] * REPLICA_RETRIES)
    assert asyncio.run(retry_replica_failures(attempt, "test")) == "ok" and len(calls) == 1 + REPLICA_RETRIES
    assert calls[2] - calls[1] > calls[1] - calls[0] > 0.2  # a longer pause each time
    attempt, calls = flaky([ActorDiedError()] * (1 + REPLICA_RETRIES))
    with pytest.raises(ActorDiedError):
        asyncio.run(retry_replica_failures(attempt, "test"))
    assert len(calls) == 1 + REPLICA_RETRIES
    attempt, calls = flaky([BadRequest("no"), ActorDiedError()])
    with pytest.raises(BadRequest):
        asyncio.run(retry_replica_failures(attempt, "test"))
    assert len(calls) == 1
    attempt, calls = flaky([ActorDiedError()] * REPLICA_RETRIES)  # past the deadline: no pauses
    asyncio.run(retry_replica_failures(attempt, "test", deadline=time.monotonic()))
    assert calls[-1] - calls[0] < 0.2
