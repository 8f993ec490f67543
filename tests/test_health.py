"""/health on a real server whose decode takes one request and queues one: a saturated stage is up
("busy", 200), not down. Its ready() is refused by Serve's full queue, so the answer comes from
Serve's own health checks, which do not queue behind requests."""
from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest

from popserve_testing import deploy
from popserve_testing import server_config as make_config
from test_reliability import App

APP = "busy"
STORY = ("Tell me a very long story about the sea and the boy, the old man and his small boat, the great "
         "fish far out in the gulf stream, the sharks that came after it, and what the boy said to the old "
         "man when he finally came back home to the harbour")


@pytest.fixture(scope="module")
def busy(ray_cluster, qwen_dir):
    from ray import serve

    cfg = make_config(qwen_dir, pop_off_prefill=False, limits={"max_tokens_limit": 950},
                      decode={"max_ongoing_requests": 1, "max_queued_requests": 1})
    yield App(APP, deploy(ray_cluster, APP, cfg), cfg.model_name())
    serve.delete(APP)


def test_a_saturated_stage_is_busy_not_down(busy):
    health = httpx.get(f"{busy.base_url}/health", timeout=30)
    assert health.status_code == 200 and all(v is True for v in health.json()["stages"].values()), health.text
    body = busy.body(STORY, max_tokens=900, stream=True)
    with httpx.Client(timeout=120) as client, client.stream("POST", busy.chat_url, json=body) as stream, \
            ThreadPoolExecutor(2) as pool:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: an abandoned iterator would close the connection
        assert next(line for line in lines if line.startswith("data: {")
                    and json.loads(line[6:])["choices"][0]["delta"].get("content"))  # decode's one slot taken
        # Two more: one waits in decode's queue of one, the other is turned away (503).
        others = [pool.submit(busy.post, busy.body(STORY, max_tokens=4), timeout=120) for _ in range(2)]
        done, _ = wait(others, timeout=60, return_when=FIRST_COMPLETED)
        assert [f.result().status_code for f in done] == [503], [f.result().text for f in done]
        during = httpx.get(f"{busy.base_url}/health", timeout=30)
        still_streaming = any(line.startswith("data: {") for line in lines)
    assert still_streaming  # the queue was full all along
    assert during.status_code == 200, during.text
    assert during.json()["stages"] == {"encoder": True, "prefill": True, "decode": "busy"}, during.json()
    assert sorted(f.result().status_code for f in others) == [200, 503]
    after = httpx.get(f"{busy.base_url}/health", timeout=30)
    assert after.status_code == 200 and all(v is True for v in after.json()["stages"].values()), after.text
