"""The disaggregated service over real HTTP on a real local Ray cluster (tiny checkpoints)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import httpx
import pytest
from PIL import Image
from popserve_testing import metric_value, server_config, wait_for_metric
from prometheus_client.parser import text_string_to_metric_families

from popserve.models.decoder import FullDecoder
from popserve.models.encoder import VisionEncoder
from popserve.models.prefill import PrefillRequest, PrunedPrefill
from popserve.models.prefix_cache import BLOCK_TOKENS, shared_blocks_tokens
from popserve.models.prompt import PromptBuilder
from popserve.models.sampling import SamplingParams

MAX_TOKENS = 8


def png(color, size=(64, 48)) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, so features differ by more than colour
        img.putpixel((x, x % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(text: str, images: list[Image.Image]) -> list[dict]:
    if not images:
        return [{"role": "user", "content": text}]
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def hf_messages(text: str, images: list) -> list[dict]:
    if not images:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]


class Reference:
    """The single-process stage runners: what the server must reproduce token for token."""

    def __init__(self, model_dir):
        self.builder = PromptBuilder(model_dir)
        self.encoder = VisionEncoder(model_dir, dtype="float32")
        self.prefill = {r: PrunedPrefill(model_dir, r, dtype="float32") for r in (1 / 3, 0.0)}
        self.decoder = FullDecoder(model_dir, 1 / 3, dtype="float32", max_seqs=2, max_seq_len=1024)

    def answer(self, text, images, pop=True, max_tokens=MAX_TOKENS, **sampling) -> str:
        p = self.builder.build(hf_messages(text, images), images)
        feats = self.encoder.encode_pixels(p.pixels)
        h = self.prefill[1 / 3 if pop else 0.0].prefill([PrefillRequest(p.input_ids, p.mm_token_type_ids, feats)])
        ids = self.decoder.generate(h, SamplingParams(max_new_tokens=max_tokens, **sampling),
                                    stop_token_ids=self.builder.eos_token_ids)[0]
        if ids and ids[-1] in self.builder.eos_token_ids:
            ids = ids[:-1]
        return self.builder.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def references(tiny_dirs):
    return {fam: Reference(d) for fam, d in tiny_dirs.items()}


def chat(server, text, images=(), pop=True, stream=False, max_tokens=MAX_TOKENS, **extra):
    body = {"model": server.model_name, "messages": openai_messages(text, list(images)),
            "max_tokens": max_tokens, "temperature": 0, "pop": pop, "stream": stream, **extra}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    return r


def read_stream(r: httpx.Response) -> tuple[str, str | None, list[dict]]:
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    return text, reasons[-1], chunks


CASES = [
    ("text", "Tell me about the sea and the boy who lived near it", []),
    ("image", "What is in this picture?", [png((200, 30, 30))]),
    ("two-images", "Compare these two pictures", [png((10, 200, 30)), png((20, 20, 230), (40, 72))]),
]


@pytest.mark.parametrize("pop", [True, False], ids=["pop", "full"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_http_greedy_matches_stage_runners(server, references, case, pop):
    _, text, images = case
    want = references[server.family].answer(text, images, pop=pop)
    r = chat(server, text, images, pop=pop)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["completion_tokens"] <= MAX_TOKENS
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.headers["x-request-id"] and body["id"].endswith(r.headers["x-request-id"])
    streamed, reason, chunks = read_stream(chat(server, text, images, pop=pop, stream=True,
                                                stream_options={"include_usage": True}))
    assert streamed == want
    assert reason == body["choices"][0]["finish_reason"]
    usage, details = dict(chunks[-1]["usage"]), chunks[-1]["usage"]["prompt_tokens_details"]
    usage.pop("prompt_tokens_details")
    assert usage == {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    # The same prompt again: every whole block of it now comes from the prefill's prefix cache.
    whole = (body["usage"]["prompt_tokens"] - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert details == {"cached_tokens": whole} and body["usage"]["prompt_tokens_details"]["cached_tokens"] <= whole


def test_stop_strings_cut_the_answer_streamed_or_not(server):
    """A stop string ends the answer before it, finish_reason "stop", the same text streamed (where
    gemma3's server sends 3 tokens per message, so the stop can fall inside one)."""
    text = "Tell me a long story about the mountains"
    full = chat(server, text, max_tokens=16).json()["choices"][0]["message"]["content"]
    assert len(full) >= 8, full
    at = len(full) // 2
    stop = full[at:at + 2]
    want = full[:full.find(stop)]
    body = chat(server, text, max_tokens=16, stop=[stop]).json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 16
    streamed, reason, _ = read_stream(chat(server, text, max_tokens=16, stop=[stop], stream=True))
    assert (streamed, reason) == (want, "stop")


def test_stream_interval_sends_several_tokens_per_event(servers):
    """The Ingress makes one SSE event of each decode message: with stream_interval 3 (gemma3's
    test server) a 16-token answer comes in at most 1 + ceil(15 / 3) content events."""
    from popserve_testing import STREAM_INTERVAL

    server, interval = servers["gemma3"], STREAM_INTERVAL["gemma3"]
    text = "Tell me a long story about the mountains"
    full = chat(server, text, max_tokens=16).json()
    streamed, _, chunks = read_stream(chat(server, text, max_tokens=16, stream=True,
                                           stream_options={"include_usage": True}))
    n = chunks[-1]["usage"]["completion_tokens"]
    assert streamed == full["choices"][0]["message"]["content"] and n == full["usage"]["completion_tokens"] == 16
    events = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(events) <= 1 + -(-(n - 1) // interval), [e["choices"][0]["delta"]["content"] for e in events]


def test_omp_spin_count_reaches_only_its_stage(servers):
    """encoder.omp_spin_count (gemma3's test server: 1000) becomes the encoder replica's libgomp
    spin count in place of passive waiting; the other stages keep passive waiting. (That its image
    answers are unchanged is test_http_greedy_matches_stage_runners on the same server.)"""
    from ray import serve

    from popserve_testing import ENCODER_OMP_SPIN

    server = servers["gemma3"]
    for stage in ("VisionEncoder", "Prefill", "Decode"):
        info = serve.get_deployment_handle(stage, app_name=server.app_name).stats.remote().result()
        if stage == "VisionEncoder":
            assert (info["omp_spin_count"], info["omp_wait_policy"]) == (str(ENCODER_OMP_SPIN["gemma3"]), None), info
        else:
            assert (info["omp_spin_count"], info["omp_wait_policy"]) == (None, "PASSIVE"), (stage, info)


def test_nice_reaches_every_thread_of_its_stage_only(servers):
    """`nice` (gemma3's test server: decode 19, ingress 16) puts every thread of the stage's replica
    (Ray's, the event loop's, torch's) at that nice; unset (the other stages, and every qwen3-vl
    stage), a replica keeps the priorities Ray gave its threads."""
    from ray import serve

    from popserve_testing import NICE

    for fam, server in servers.items():
        pids = {stage: serve.get_deployment_handle(stage, app_name=server.app_name).stats.remote().result()["pid"]
                for stage in ("VisionEncoder", "Prefill", "Decode", "Ingress")}
        for stage, pid in pids.items():
            nices, want = thread_nices(pid), NICE[fam].get(stage)
            if want is not None:
                assert nices == {want}, (fam, stage, nices)
            else:
                assert len(nices) > 1 and max(nices) < 16, (fam, stage, nices)  # Ray's mix of 0 and 15


def test_set_nice_reaches_every_thread_and_says_which_it_could_not_lower():
    """Unprivileged (as in most containers), a replica may raise its threads' nice but not lower
    it: set_nice then leaves those threads as they are and logs how many, instead of failing."""
    import subprocess
    import sys

    code = (
        "import json, logging, os, threading\n"
        "from popserve.service.deployments import common\n"
        "if os.geteuid() == 0:\n"
        "    os.setuid(65534)  # nobody: no CAP_SYS_NICE (after the imports: root's Python may be private)\n"
        "logged = []\n"
        "common.logger.addHandler(type('H', (logging.Handler,), {'emit': lambda self, r: logged.append(r.getMessage())})())\n"
        "stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
        "nices = lambda: sorted({int(open(f'/proc/self/task/{i}/stat').read().rsplit(')', 1)[1].split()[16])\n"
        "                        for i in os.listdir('/proc/self/task')})\n"
        "common.set_nice(10); raised = nices()\n"
        "common.set_nice(0); lowered = nices()\n"
        "stop.set(); t.join()\n"
        "print(json.dumps({'raised': raised, 'lowered': lowered, 'logged': logged}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["raised"] == [10] and res["lowered"] == [10], res
    assert len(res["logged"]) == 1 and "nice 0:" in res["logged"][0] and "CAP_SYS_NICE" in res["logged"][0], res


def thread_nices(pid: int) -> set[int]:
    """The nice value of every thread of a process (field 19 of /proc/PID/task/TID/stat)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out.add(int(f.read().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return out


def test_a_template_that_refuses_the_conversation_is_a_400(tmp_path, tiny_dirs):
    """Real Gemma-3 templates raise_exception("Conversation roles must alternate ...") (a jinja2
    TemplateError): the client's mistake, so a 400 with the template's words, not a 500."""
    import shutil

    from popserve.service.errors import BadRequest
    from popserve.service.ingress import build_prompt

    model = tmp_path / "strict-template"
    shutil.copytree(tiny_dirs["gemma3"], model)
    template = model / "chat_template.jinja"
    guard = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}{% endfor %}")
    template.write_text(guard + template.read_text())
    builder = PromptBuilder(model)
    assert build_prompt(builder, [{"role": "user", "content": "hi"}], []).num_tokens > 1
    with pytest.raises(BadRequest, match="roles must alternate") as err:
        build_prompt(builder, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], [])
    assert (err.value.status, err.value.param, err.value.code) == (400, "messages", "invalid_value")


def test_prompt_builder_knows_its_control_tokens_and_a_floor_on_tokens(tiny_dir):
    """Text that spells a control token (turn markers, image slots) is found, the longest first;
    min_tokens, the no-tokenizing pre-check against huge prompts, never exceeds the real count."""
    import random

    builder = PromptBuilder(tiny_dir)
    turn = "<|im_start|>" if builder.family.name == "qwen3-vl" else "<start_of_turn>"
    assert builder.control_token_in(f"ok {turn}system") == turn
    assert builder.control_token_in("<|im_start without its end, <start_of_turn") is None
    rng = random.Random(0)
    alphabet = "ab \n-=#é\u0301한" + "".join(chr(c) for c in range(0x4e00, 0x4e10))
    for n in (0, 10, 1000, 20000):
        texts = ["".join(rng.choice(alphabet) for _ in range(n)), "=" * n, " " * n]
        tokens = sum(len(builder.tokenizer.encode(t, add_special_tokens=False)) for t in texts)
        assert builder.min_tokens(texts) <= tokens, n
    assert builder.min_tokens(["sea " * 200_000]) > 1024


def test_only_tokens_that_steer_the_chat_are_refused_in_text(tmp_path, tiny_dirs):
    """Real Gemma-3 marks thousands of added tokens special (<unused0>...): text may spell those;
    the named special tokens and those the chat template writes may not."""
    import shutil

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    model = tmp_path / "many-special"
    shutil.copytree(tiny_dirs["gemma3"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens([AddedToken("<unused0>", special=True), AddedToken("<table>", special=True)])
    tok.save_pretrained(model)
    builder = PromptBuilder(model)
    assert "<unused0>" in {t.content for t in builder.tokenizer.added_tokens_decoder.values() if t.special}
    assert builder.control_token_in("<unused0> and <table>") is None
    assert builder.control_token_in("<end_of_turn>") == "<end_of_turn>" and builder.control_token_in("<bos>") == "<bos>"


def test_a_stage_given_in_part_keeps_its_own_defaults():
    """`decode: {num_replicas: 2}` (a YAML file, KubeRay's args, a bench arm) changes that and only
    that: decode keeps its one thread and 128 streams, the Ingress its 256 requests, and
    prefill_full given in part keeps prefill's settings. An explicit null still means "unset"."""
    from popserve.service.config import ServeConfig

    default = ServeConfig()
    cfg = ServeConfig.model_validate({"decode": {"num_replicas": 2}, "ingress": {"nice": 16},
                                      "prefill": {"torch_threads": 1, "max_ongoing_requests": 8},
                                      "prefill_full": {"num_replicas": 3}})
    assert cfg.decode == default.decode.model_copy(update={"num_replicas": 2})
    assert cfg.ingress == default.ingress.model_copy(update={"nice": 16})
    assert (default.decode.torch_threads, default.ingress.max_ongoing_requests) == (1, 256)
    assert cfg.prefill_full == cfg.prefill.model_copy(update={"num_replicas": 3})
    assert ServeConfig.model_validate({"decode": {"torch_threads": None}}).decode.torch_threads is None
    with pytest.raises(ValueError, match="-1 .unbounded. or at least 1"):  # Serve would refuse 0 only at deploy
        ServeConfig.model_validate({"decode": {"max_queued_requests": 0}})
    assert ServeConfig.model_validate(cfg.model_dump()) == cfg  # a dumped config reads back the same


def test_stages_that_hold_streams_drain_them_when_stopped():
    """Scale-down, upgrades and shutdown give the Ingress and decode a minute to finish their
    streams (Serve's graceful shutdown); the other stages' calls are short."""
    from popserve.service.config import ServeConfig
    from popserve.service.deployments.common import deployment_options

    cfg = ServeConfig.model_validate({"decode": {"num_replicas": 2}, "encoder": {"graceful_shutdown_timeout_s": 1}})
    drain = {name: deployment_options(name, cfg.stage(stage), cfg)["graceful_shutdown_timeout_s"]
             for name, stage in (("Ingress", "ingress"), ("Decode", "decode"), ("Prefill", "prefill"),
                                 ("VisionEncoder", "encoder"))}
    assert drain == {"Ingress": 60.0, "Decode": 60.0, "Prefill": 5.0, "VisionEncoder": 1.0}


def test_default_threads_follow_the_container_cpu_limit(tmp_path):
    """A replica without torch_threads takes the cores it may use: its affinity, capped by a
    cgroup v2 CPU quota (a pod's CPU limit), not os.cpu_count(), which counts the node's."""
    from popserve.service.deployments.common import available_cores

    mine = len(os.sched_getaffinity(0))
    for text, want in (("max 100000", mine), ("100000 100000", 1), ("150000 100000", min(mine, 2)),
                       ("1000 100000", 1), ("", mine), ("garbage", mine)):
        (tmp_path / "cpu.max").write_text(text)
        assert available_cores(str(tmp_path / "cpu.max")) == want, text
    assert available_cores(str(tmp_path / "missing")) == mine


@pytest.mark.parametrize("zero_copy", [True, False])
def test_zero_copy_tensors_maps_a_handoff_from_the_store(ray_cluster, zero_copy):
    """zero_copy_tensors (default on): a KV handoff that a Prefill replica returns is read by a
    Decode replica in place, from Ray's shared-memory store; off, it is copied through the pickle into
    the reader's heap. (Measured: 1.15x TTFT on 2048-token prompts, bench/results/zero-copy.md.)
    Tasks with each stage's runtime env stand in for the replicas, so both settings run."""
    import ray
    import torch

    from popserve.models.kv import KVHandoff
    from popserve.service.config import ServeConfig
    from popserve.service.deployments.common import deployment_options

    cfg = ServeConfig(zero_copy_tensors=zero_copy)
    env = {stage: deployment_options(stage, settings, cfg)["ray_actor_options"]["runtime_env"]
           for stage, settings in (("Prefill", cfg.prefill), ("Decode", cfg.decode))}

    shape = (4, 2, 2, 300, 64)  # [L, K/V, kv heads, tokens, head dim]: 1.2 MB, stored in Ray's store
    expected = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape).to(torch.bfloat16)

    @ray.remote(runtime_env=env["Prefill"])
    def prefill():
        return KVHandoff.pack(expected.clone(), ["full_attention"] * 4, [None] * 4, last_token=7, rope_delta=0,
                              pop_ratio=1 / 3, skipped_layers=1, fingerprint="f" * 16, prompt_tokens=301)

    @ray.remote(runtime_env=env["Decode"])
    def decode(handoff):
        ptr = handoff.kv.data_ptr()
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return " ".join(line.split()[5:]) or "anonymous", handoff.kv.float().sum().item()

    mapping, total = ray.get(decode.remote(prefill.remote()))
    assert total == expected.float().sum().item()  # the same bytes arrived
    assert ("/dev/shm/plasma" in mapping) is zero_copy, mapping


def _plasma_needed_bytes() -> float:
    """Bytes of Ray's object store that are still referenced (pinned), as `ray memory --stats-only`
    reports them; freed objects can linger in the store for a second but are no longer "needed"."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    pct = re.search(r"Plasma memory usage .*?([\d.]+)% needed", memory_summary(stats_only=True)).group(1)
    return float(pct) / 100 * ray.cluster_resources()["object_store_memory"]


def test_kv_handoff_leaves_the_object_store_once_decode_holds_it(servers):
    """A KV handoff lives in Ray's store only until decode has copied it into its pool: while six
    long-prompt requests are still streaming, the store needs less than two of their handoffs.
    (Handed to decode as an argument of its stream, each handoff stayed pinned until the stream's
    last token: a second copy of every running prompt's KV.)"""
    from ray import serve

    server = servers["qwen3-vl"]
    decode = serve.get_deployment_handle("Decode", app_name=server.app_name)
    text = " ".join(f"w{i}" for i in range(200))  # ~740 prompt tokens (a ~1 MiB handoff): with 200 new, inside max_seq_len
    n = 6
    before = decode.stats.remote().result()
    baseline = _plasma_needed_bytes()

    async def scenario():
        body = {"model": server.model_name, "messages": [{"role": "user", "content": text}],
                "max_tokens": 200, "temperature": 1.0, "seed": 0, "stream": True}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            streams = [client.stream("POST", "/v1/chat/completions", json={**body, "seed": i}) for i in range(n)]
            responses = [await s.__aenter__() for s in streams]
            for r in responses:
                assert r.status_code == 200, (await r.aread()).decode()
            lines = [r.aiter_lines() for r in responses]
            for it in lines:  # every request has its first token: its KV is in decode's pool
                while not (await it.__anext__()).startswith("data: {"):
                    pass
            held = _plasma_needed_bytes()
            running = (await decode.stats.remote())["running"]
            for it in lines:
                async for _ in it:
                    pass
            for s in streams:
                await s.__aexit__(None, None, None)
            return held, running

    held, running = asyncio.run(scenario())
    after = decode.stats.remote().result()
    handoff = (after["handoff_bytes"] - before["handoff_bytes"]) / n
    assert after["handoffs"] - before["handoffs"] == n and handoff >= 2**20, (before, after)
    assert running >= n // 2, "the streams ended before the store was read; make them longer"
    assert held - baseline < 2 * handoff, (held, baseline, handoff)  # pinned, it was >= n handoffs


def test_pop_switch_changes_the_computation(servers, references):
    """POP on and off are really different prefill paths (random weights: outputs diverge)."""
    server = servers["gemma3"]
    text = "Compare these two pictures"
    images = CASES[2][2]
    ref = references["gemma3"]
    assert ref.answer(text, images, pop=True, max_tokens=16) != ref.answer(text, images, pop=False, max_tokens=16)
    on = chat(server, text, images, pop=True, max_tokens=16).json()["choices"][0]["message"]["content"]
    off = chat(server, text, images, pop=False, max_tokens=16).json()["choices"][0]["message"]["content"]
    assert on != off


def test_openai_client_with_image(servers):
    import openai

    server = servers["qwen3-vl"]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    msgs = openai_messages("Describe the image", [png((0, 120, 240))])
    resp = client.chat.completions.create(model=server.model_name, messages=msgs, max_tokens=6, temperature=0)
    content = resp.choices[0].message.content
    assert content and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=server.model_name, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for ev in stream:
        if ev.choices:
            parts.append(ev.choices[0].delta.content or "")
        if ev.usage:
            usage = ev.usage
    assert "".join(parts) == content
    assert usage.completion_tokens == resp.usage.completion_tokens
    # The openai package reads our prompt_tokens_details: the repeated prompt's whole blocks were cached.
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_name]


def test_logprobs_logit_bias_and_penalties_through_the_openai_client(server):
    """OpenAI's logprobs, top_logprobs, logit_bias and penalties, read by the real `openai` package:
    one entry per generated token, its bytes being the answer's; streamed and whole alike; each
    choice the best of the returned 20 likeliest after bias and penalties; a biased token forced."""
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    tokenizer = PromptBuilder(server.model_dir).tokenizer
    msgs = openai_messages("Name the colours of the evening sky", [png((200, 90, 40))])
    ask = dict(model=server.model_name, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=20,
               frequency_penalty=1.0, presence_penalty=0.5)
    whole = client.chat.completions.create(**ask)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    text = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    if whole.choices[0].finish_reason == "stop":  # the end-of-turn token is listed, not part of the text
        text = text.removesuffix(entries[-1].token)
    assert text == whole.choices[0].message.content
    seen: list[str] = []
    for e in entries:
        top = {t.token: t.logprob for t in e.top_logprobs}
        assert len(e.top_logprobs) == 20 and list(top.values()) == sorted(top.values(), reverse=True)
        adjusted = {t: lp - 1.0 * seen.count(t) - 0.5 * (t in seen) for t, lp in top.items()}
        best = max(adjusted, key=adjusted.get)
        if adjusted[best] >= min(top.values()):
            assert e.token == best and e.logprob == pytest.approx(top[best], abs=1e-4)
        seen.append(e.token)
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [(e.token, e.bytes) for chunk in streamed for e in chunk] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for chunk in streamed for e in chunk] == pytest.approx([e.logprob for e in entries], abs=1e-4)

    token = tokenizer.encode(" sky", add_special_tokens=False)[-1]
    forced = client.chat.completions.create(model=server.model_name, messages=msgs, max_tokens=5, temperature=0.7,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == tokenizer.decode([token] * 5)
    plain = client.chat.completions.create(model=server.model_name, messages=msgs, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_repetition_penalty_and_min_p_through_the_openai_client(server, references):
    """vLLM's repetition_penalty and min_p in the `openai` package's extra_body: greedy with the
    penalty answers what the stage runners answer with it (and the penalty changes some answer);
    min_p 1 keeps only the likeliest token, so three sampled choices are the greedy answer;
    impossible values are 400s naming the field."""
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    ref, changed = references[server.family], 0
    for _, text, images in CASES[:2]:
        ask = dict(model=server.model_name, messages=openai_messages(text, images), max_tokens=16)
        penalised = client.chat.completions.create(**ask, temperature=0, extra_body={"repetition_penalty": 1.6})
        assert penalised.choices[0].message.content == ref.answer(text, images, max_tokens=16, repetition_penalty=1.6)
        greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
        changed += penalised.choices[0].message.content != greedy
        likeliest = client.chat.completions.create(**ask, temperature=1.0, n=3, extra_body={"min_p": 1.0})
        assert [c.message.content for c in likeliest.choices] == [greedy] * 3
    assert changed
    for extra in ({"repetition_penalty": 0}, {"repetition_penalty": 2.5}, {"min_p": 1.5}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**ask, extra_body=extra)
        assert err.value.body["param"] == next(iter(extra)), err.value.body


def test_fixed_length_answers_as_benchmark_tools_ask_for_them(servers):
    """vLLM's ignore_eos, min_tokens and stop_token_ids, sent by the real `openai` package in
    extra_body as `vllm bench serve` sends them, with logit_bias pushing the end of turn: it ends
    the answer at once, after min_tokens, never (ignore_eos: max_tokens, "length"), or again when
    stop_token_ids names it; impossible values are 400s naming the field."""
    import openai

    server = servers["qwen3-vl"]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    eos = PromptBuilder(server.model_dir).eos_token_ids[0]

    def ask(max_tokens=6, **extra):
        r = client.chat.completions.create(model=server.model_name, messages=openai_messages("Say something", []),
                                           max_tokens=max_tokens, temperature=0, logit_bias={str(eos): 100},
                                           extra_body=extra)
        return r.usage.completion_tokens, r.choices[0].finish_reason

    assert ask() == (1, "stop")
    assert ask(min_tokens=4) == (5, "stop")
    assert ask(ignore_eos=True) == (6, "length")
    assert ask(ignore_eos=True, stop_token_ids=[eos]) == (1, "stop")
    for extra, param in (({"max_tokens": 3, "min_tokens": 4}, "min_tokens"), ({"stop_token_ids": [10**9]}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError) as err:
            ask(**extra)
        assert err.value.body["param"] == param, err.value.body


def test_n_choices_whole_and_streamed_through_the_openai_client(server):
    """n = 3 seeded choices come from one prefill (the Prefill replica counts one prompt): three
    answers, not all the same, usage summing their tokens; streamed, the chunks of each index
    add up to the same three answers; greedy choices are equal; n over what decode runs at once
    is a 400 naming n."""
    import openai
    from ray import serve

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    ask = dict(model=server.model_name, messages=openai_messages("Tell me about the sea", [png((20, 60, 200))]),
               max_tokens=8, temperature=1.0, seed=5, n=3)
    prefill = serve.get_deployment_handle("Prefill", app_name=server.app_name)
    before = prefill.stats.remote().result()["prompts"]
    whole = client.chat.completions.create(**ask)
    assert prefill.stats.remote().result()["prompts"] - before == 1
    answers = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(answers)) > 1
    assert whole.usage.completion_tokens == 3 * 8 or all(c.finish_reason for c in whole.choices)
    parts, finish = {0: "", 1: "", 2: ""}, {}
    for event in client.chat.completions.create(**ask, stream=True):
        for c in event.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == answers
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    greedy = client.chat.completions.create(**{**ask, "temperature": 0, "n": 2})
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{**ask, "n": 17})  # over 16; over max_running_seqs: test_engine
    assert err.value.body["param"] == "n"

    # A choice that writes a stop string ends there in decode too: decode makes no more tokens for it.
    decode = serve.get_deployment_handle("Decode", app_name=server.app_name)
    long = {**ask, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    texts = [c.message.content for c in sorted(client.chat.completions.create(**long).choices, key=lambda c: c.index)]
    stops = [t[2:8] for t in texts if len(t) > 12 and sum(t[2:8] in u for u in texts) == 1]
    assert stops, f"no choice has a start of its own to stop at: {texts}"
    stop = stops[0]
    before = decode.stats.remote().result()["tokens_out"]
    stopped = client.chat.completions.create(**long, stop=[stop])
    made = decode.stats.remote().result()["tokens_out"] - before
    reasons = sorted(c.finish_reason for c in stopped.choices)
    assert reasons == ["length", "length", "stop"] and made == stopped.usage.completion_tokens < 3 * 40 - 20


def _question(i: int) -> str:
    """The i-th of 16 text prompts of growing length (about 1300 tokens together)."""
    return " ".join(["word"] * (3 + 7 * i)) + f" question {i}"


def test_concurrent_requests_match_solo(servers):
    """16 concurrent greedy requests of different lengths, some with images, each return exactly
    what they return alone: continuous batching never mixes sequences."""
    server = servers["qwen3-vl"]
    reqs = []
    for i in range(16):
        text = _question(i)
        images = [png(((40 * i) % 255, 90, 200 - 10 * i))] if i % 3 == 0 else []
        reqs.append((text, images, 4 + i % 5))
    solo = [chat(server, t, im, max_tokens=n).json()["choices"][0]["message"]["content"] for t, im, n in reqs]

    async def run_all():
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(t, im, n):
                body = {"model": server.model_name, "messages": openai_messages(t, im), "max_tokens": n,
                        "temperature": 0}
                r = await client.post(f"{server.base_url}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]
            return await asyncio.gather(*(one(*r) for r in reqs))

    together = asyncio.run(run_all())
    assert together == solo
    assert len(set(solo)) > 8  # the requests really differ


def test_prefill_batches_are_limited_by_prompt_tokens(servers):
    """16 text prompts (about 1300 tokens) sent to the Prefill deployment at once (as decode
    replicas send them) go in several batches, none over the token budget, some of several prompts."""
    from ray import serve

    server = servers["qwen3-vl"]
    builder = PromptBuilder(server.model_dir)
    # their own words first: test_concurrent_requests_match_solo put _question(i) in the prefix cache
    prompts = [builder.build([{"role": "user", "content": f"Budget burst {i}. " + _question(i)}]) for i in range(16)]
    tokens = sum(p.num_tokens for p in prompts)
    prefill = serve.get_deployment_handle("Prefill", app_name=server.app_name)
    before = prefill.stats.remote().result()

    async def burst():
        return await asyncio.gather(*(prefill.prefill.remote(p.input_ids, None, None) for p in prompts))

    handoffs = asyncio.run(burst())
    assert [h.prompt_tokens for h in handoffs] == [p.num_tokens for p in prompts]
    stats = prefill.stats.remote().result()
    budget = stats["batch_token_budget"]
    assert budget == 256 and tokens > 1000 and stats["prompts"] - before["prompts"] == len(prompts)
    batches = stats["batches"] - before["batches"]
    assert tokens // budget <= batches < len(prompts)  # several batches, some of several prompts
    assert 0 < stats["largest_batch_tokens"] <= budget


def test_cached_tokens_do_not_count_against_the_prefill_batch_budget(servers):
    """Prompts of ~237 tokens that share a cached 192-token start are each budgeted at the tokens
    they compute, so a burst of 8 runs in a few batches of several prompts; counted whole, each
    would fill the 256-token budget alone and take a batch of its own."""
    from ray import serve

    server = servers["qwen3-vl"]
    builder = PromptBuilder(server.model_dir)
    lead = "Budget test: the ledger of the northern harbour lists ships, cargo and crews. " * 5
    questions = ["Which ship came first?", "Who owns the red boat?", "How much grain was sold?",
                 "Where do crews sleep?", "What did the captain say?", "Why was the cargo late?",
                 "When does the tide turn?", "Which crew is largest?", "Is the harbour open today?"]
    prompts = [builder.build([{"role": "user", "content": lead + q}]) for q in questions]
    shared = min(shared_blocks_tokens(prompts[0].input_ids[:-1], p.input_ids[:-1]) for p in prompts[1:])
    assert shared >= 6 * BLOCK_TOKENS and all(2 * (p.num_tokens - shared) < 256 < 2 * p.num_tokens for p in prompts)
    prefill = serve.get_deployment_handle("Prefill", app_name=server.app_name)
    prefill.prefill.remote(prompts[0].input_ids, None, None).result()  # the shared start, cached
    before = prefill.stats.remote().result()

    async def burst():
        return await asyncio.gather(*(prefill.prefill.remote(p.input_ids, None, None) for p in prompts[1:]))

    handoffs = asyncio.run(burst())
    assert all(h.cached_tokens >= shared for h in handoffs)
    stats = prefill.stats.remote().result()
    assert stats["prompts"] - before["prompts"] == 8
    assert stats["batches"] - before["batches"] <= 4  # counted whole: 8 batches


def test_prefix_cache_reuses_a_shared_start_and_answers_the_same(server, references):
    """Two questions about one image after the same long lead-in: the second prompt's shared whole
    blocks come from the Prefill replica's prefix cache (its hits grow by exactly them, its computed
    tokens by the rest, and /metrics counts them), and both answers are the cache-less stage
    runners' token for token."""
    from ray import serve

    lead = "Read this picture the way a museum guide would describe it to visitors, slowly. " * 4
    img = [png((90, 140, 200))]
    texts = [lead + "What colour is it?", lead + "Is there a line across it?"]
    builder = PromptBuilder(server.model_dir)
    a, b = (builder.build(hf_messages(t, img), img).input_ids[:-1] for t in texts)  # what prefill computes
    shared = shared_blocks_tokens(a, b)
    assert shared > int((b == builder.family.image_token_id).nonzero()[-1]) + BLOCK_TOKENS  # the image too

    prefill = serve.get_deployment_handle("Prefill", app_name=server.app_name)
    answers, cached, stats = [], [], [prefill.stats.remote().result()]
    for t in texts:
        r = chat(server, t, img)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        stats.append(prefill.stats.remote().result())
    assert stats[2]["prefix_cache_hit_tokens"] - stats[1]["prefix_cache_hit_tokens"] == shared == cached[1]
    assert stats[2]["tokens"] - stats[1]["tokens"] == len(b) - shared
    assert 0 < stats[2]["prefix_cache_bytes"] <= server_config(server.model_dir).prefix_cache_bytes
    assert answers == [references[server.family].answer(t, img) for t in texts]
    wait_for_metric(lambda: httpx.get(f"{server.base_url}/metrics").text, "ray_popserve_prefix_cache_hit_tokens_total",
                    lambda v: v >= stats[2]["prefix_cache_hit_tokens"], stage="prefill")


def test_cache_salt_keeps_tenants_apart(servers):
    """A prompt reuses cached KV only from prompts sent with the same cache_salt (vLLM's field),
    so that one tenant cannot learn another's prompts from its response times."""
    server = servers["qwen3-vl"]
    text = "Tenant test: recall the long list of harbour ships, their sails and their captains. " * 3

    def cached(salt):
        r = chat(server, text, cache_salt=salt)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], r.json()["usage"]["prompt_tokens"]

    first, n = cached("tenant-a")
    whole = (n - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert first == 0 and whole >= 2 * BLOCK_TOKENS
    assert [cached(salt)[0] for salt in ("tenant-b", None, "tenant-a")] == [0, 0, whole]
    bad = chat(server, text, cache_salt="")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", bad.text


def test_stages_are_separate_actors_and_prefill_is_pruned(servers):
    import ray
    from ray import serve

    from popserve_testing import INGRESS_TORCH_THREADS

    server = servers["qwen3-vl"]
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    pids = {}
    for stage in ("VisionEncoder", "Prefill", "PrefillFull", "Decode", "Ingress"):
        assert any(f"{server.app_name}#{stage}#" in n for n in named), f"no replica actor for {stage}: {named}"
        info = serve.get_deployment_handle(stage, app_name=server.app_name).stats.remote().result()
        pids[stage] = info["pid"]
        # Each stage runs its own configured thread count (tests: 1; the default would be every
        # core; the Ingress's image processor 1, which this test server sets to 2) and waits
        # passively, so that stages sharing cores don't spin against each other.
        threads = INGRESS_TORCH_THREADS[server.family] if stage == "Ingress" else 1
        assert info["torch_threads"] == threads and info["omp_wait_policy"] == "PASSIVE", (stage, info)
        # glibc keeps freed activations instead of page-faulting them in again on every prefill.
        assert int(info["malloc_trim_threshold"]) >= 2**30, (stage, info)
    assert len(set(pids.values())) == len(pids), f"stages share a process: {pids}"

    handle = serve.get_deployment_handle("Prefill", app_name=server.app_name)
    names = handle.held_parameter_names.remote().result()
    stats = handle.stats.remote().result()
    L, k = stats["num_layers"], stats["skipped_layers"]
    assert k == round(L / 3) and k > 0
    for layer in range(L - k, L):
        held = [n for n in names if n.startswith(f"layers.{layer}.")]
        assert held and all(any(s in n for s in ("input_layernorm", "k_proj", "v_proj", "k_norm")) for n in held)
        assert not any("mlp" in n or "q_proj" in n or "o_proj" in n for n in held)
    assert any(n.startswith(f"layers.{L - k - 1}.mlp.") for n in names)
    assert not any(n.startswith("norm.") for n in names)


def _error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    return err


def test_errors_are_openai_shaped_and_server_keeps_serving(servers):
    server = servers["gemma3"]
    url = f"{server.base_url}/v1/chat/completions"
    _error(httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404,
           "model_not_found")
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json")
    _error(httpx.post(url, json={"model": server.model_name, "messages": []}), 400)
    _error(httpx.post(url, json={"model": server.model_name}), 400)
    long_text = " ".join(["sea"] * 3000)
    _error(chat(server, long_text), 400, "context_length_exceeded")
    _error(chat(server, "hi", max_tokens=100000), 400)
    ok = chat(server, "still there?")
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_health_models_metrics(servers):
    server = servers["qwen3-vl"]
    h = httpx.get(f"{server.base_url}/health")
    assert h.status_code == 200 and all(h.json()["stages"].values())

    def fetch():
        return httpx.get(f"{server.base_url}/metrics").text

    def count(text, name, **labels):
        try:
            return metric_value(text, name, **labels)
        except KeyError:
            return 0

    m = fetch()
    requests, handoffs = count(m, "ray_popserve_requests_total", code="200"), count(m, "ray_popserve_kv_handoffs_total")
    assert chat(server, "count the tokens").status_code == 200
    # The Ingress and decode export on their own clocks: wait for both.
    wait_for_metric(fetch, "ray_popserve_requests_total", lambda v: v >= requests + 1, code="200")
    m = wait_for_metric(fetch, "ray_popserve_kv_handoffs_total", lambda v: v >= handoffs + 1)
    for name in ("ray_popserve_time_to_first_token_seconds_bucket", "ray_popserve_inter_token_latency_seconds_bucket",
                 "ray_popserve_stage_queue_depth", "ray_popserve_decode_running_sequences",
                 "ray_popserve_kv_handoff_bytes_total", "ray_popserve_pop_layers_skipped"):
        assert name in m, name
    families = {f.name: f for f in text_string_to_metric_families(m)}
    assert families["ray_popserve_kv_handoffs"].type == "counter"
    assert families["ray_popserve_decode_kv_bytes_in_use"].type == "gauge"
    assert metric_value(m, "ray_popserve_kv_handoff_bytes_total") > 0
    assert metric_value(m, "ray_popserve_pop_layers_skipped", stage="prefill") == 2.0
    assert metric_value(m, "ray_popserve_pop_layers_skipped", stage="prefill_full") == 0.0
    # Request phases seen by the ingress, and each stage's own compute time.
    assert metric_value(m, "ray_popserve_stage_latency_seconds_count", stage="prepare") >= 1
    assert metric_value(m, "ray_popserve_stage_latency_seconds_count", stage="first_token") >= 1
    for stage in ("prefill", "decode"):
        assert metric_value(m, "ray_popserve_stage_busy_seconds_total", stage=stage) > 0
        assert metric_value(m, "ray_popserve_stage_batches_total", stage=stage) >= 1
    # Only this application's samples (the gemma3 server shares the node), each with its
    # replica, and none of Ray's process labels.
    samples = [s for f in families.values() for s in f.samples]
    assert {s.labels["application"] for s in samples} == {server.app_name}
    assert all(s.labels.get("replica") for s in samples)
    assert not {k for s in samples for k in s.labels} & {"WorkerId", "SessionName", "Component", "NodeAddress"}
