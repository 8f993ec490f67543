"""KV handoffs between replicas that share a GPU go by CUDA IPC (service/handoff.py). GPU only.

Two Ray actors on one GPU (fractional num_gpus, as popserve's stages are placed): the producer
returns a handoff for the consumer's location, the consumer receives it as a CUDA tensor with the
producer's values; a handoff for no location, another node or another GPU comes in host memory;
and the producer's GPU memory is released once the consumer and the driver drop it.
"""
from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")

SHAPE = (36, 2, 8, 2048, 128)  # a 2048-token handoff of the Qwen3-VL 8B shape: 288 MiB in bf16


@pytest.fixture(scope="module")
def replicas(ray_cluster):
    import ray

    from popserve.models.kv import KVHandoff
    from popserve.service.handoff import gpu_location, receive, send

    @ray.remote(num_gpus=0.4)
    class Replica:
        def location(self):
            return gpu_location()

        async def produce(self, deliver_to, seed: int):
            g = torch.Generator(device="cuda").manual_seed(seed)
            kv = torch.randn(SHAPE, generator=g, device="cuda").to(torch.bfloat16)
            self.checksum = float(kv.float().sum())
            handoff = KVHandoff.pack(kv, ["full_attention"] * SHAPE[0], [None] * SHAPE[0], last_token=1, rope_delta=0,
                                     pop_ratio=1 / 3, skipped_layers=12, fingerprint="f",
                                     prompt_tokens=SHAPE[3] + 1, created_at=time.time())
            return await send(handoff, deliver_to)

        async def consume(self, handoff):
            t = time.perf_counter()
            h = await receive(handoff)
            total = float(h.kv.float().sum())  # reads every byte, after the producer's event
            return h.kv.is_cuda, (len(h.kept), *h.layers()[0].shape), total, time.perf_counter() - t

        def allocated(self) -> int:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()

        def last_checksum(self) -> float:
            return self.checksum

    producer, consumer = Replica.remote(), Replica.remote()
    yield ray, producer, consumer
    for a in (producer, consumer):
        ray.kill(a)


def test_handoff_to_a_replica_on_the_same_gpu_goes_by_cuda_ipc(replicas):
    ray, producer, consumer = replicas
    where = ray.get(consumer.location.remote())
    assert where is not None and where[1], "Ray gave the consumer no GPU"
    baseline = ray.get(producer.allocated.remote())
    held = []
    for seed in range(4):
        handoff = ray.get(producer.produce.remote(where, seed))
        assert isinstance(handoff.kv, ray.ObjectRef)  # only a reference came back to the driver
        on_gpu, shape, total, seconds = ray.get(consumer.consume.remote(handoff))
        assert on_gpu and shape == SHAPE
        assert total == pytest.approx(ray.get(producer.last_checksum.remote()), rel=1e-6)
        print(f"CUDA IPC handoff of {SHAPE}: {seconds * 1000:.1f} ms")
        del handoff
        time.sleep(0.5)  # Ray's reference counting reaches the producer
        held.append(ray.get(producer.allocated.remote()) - baseline)
    # Each send sweeps the blocks that every holder dropped: the producer holds the last handoff
    # (waiting for its receivers to let go) and at most one more, not all four.
    nbytes = torch.Size(SHAPE).numel() * 2
    assert max(held) <= 2 * nbytes, [h / nbytes for h in held]


@pytest.mark.parametrize("elsewhere", [None, "another node", "another GPU"])
def test_handoff_for_no_or_another_location_waits_in_host_memory(replicas, elsewhere):
    """No location (decode will make the request wait for a slot, or gpu_handoff: host), another
    node or another GPU: the KV comes back in host memory, and stays there until decode admits it."""
    ray, producer, consumer = replicas
    node, gpus = ray.get(consumer.location.remote())
    deliver_to = {None: None, "another node": ("0" * len(node), gpus), "another GPU": (node, ("99",))}[elsewhere]
    handoff = ray.get(producer.produce.remote(deliver_to, 2))
    assert isinstance(handoff.kv, torch.Tensor) and not handoff.kv.is_cuda
    on_gpu, shape, total, seconds = ray.get(consumer.consume.remote(handoff))
    assert not on_gpu and shape == SHAPE
    assert total == pytest.approx(ray.get(producer.last_checksum.remote()), rel=1e-6)
