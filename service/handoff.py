"""How a KV handoff travels from a prefill replica to the decode replica that asked for it.

By default it is an ordinary object in Ray's object store: shared memory on a CPU node, read in
place (`zero_copy_tensors`). A handoff computed on a GPU would go through host memory twice that
way: 288 MiB for a 2048-token prompt of the 8B shape, ~250 ms on an H200, longer than the prefill.
So when the decode replica sits on the same node and GPU as the prefill replica, the KV goes
through Ray Direct Transport's CUDA IPC instead (`gpu_handoff: cuda_ipc`): the prefill replica
keeps the tensor in its GPU object store and sends a handle, decode maps the same GPU memory, copies
it into its pool, and Ray's reference counting frees the prefill's copy when decode drops it.
Decode asks for that only when the request will get a slot at once: a handoff that waits for one
(up to `engine.max_waiting` of them, 288 MiB each at 2048 tokens) waits in host memory.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Optional

import ray
import torch

from popserve.models.kv import KVHandoff

Location = tuple[str, tuple[str, ...]]  # (Ray node id, GPU ids Ray gave the replica)


@functools.cache  # Ray gives a replica its GPUs for life: asked once, not on every send
def gpu_location() -> Optional[Location]:
    """Where this replica's GPU work runs, for a prefill replica to tell whether CUDA IPC reaches it."""
    gpus = ray.get_gpu_ids()
    return (ray.get_runtime_context().get_node_id(), tuple(map(str, gpus))) if gpus else None


async def send(handoff: KVHandoff, deliver_to: Optional[Location]) -> KVHandoff:
    """The handoff to return: its KV moved into Ray's GPU object store when the receiver shares
    this replica's node and GPU (`deliver_to`), else into host memory, where it waits in Ray's
    object store, not on any GPU, until decode admits it."""
    if not handoff.kv.is_cuda:
        return handoff
    here = gpu_location()
    if (deliver_to is None or here is None or deliver_to[0] != here[0]
            or here[1][handoff.kv.device.index or 0] not in deliver_to[1]):
        # Off the event loop (288 MiB at 2048 tokens); left on the GPU, torch's pickling would put
        # it back on decode's GPU the moment it arrives.
        handoff.kv = await asyncio.to_thread(handoff.kv.cpu)
        return handoff
    # A sent block whose tensor Ray has dropped waits in torch's IPC limbo until its receivers let
    # go too; sweep it on each send, or this replica would hold every past handoff's memory until
    # an allocation fails, starving the other stages on the GPU.
    torch.cuda.ipc_collect()
    handoff.kv = ray.put(handoff.kv, _tensor_transport="cuda_ipc")
    return handoff


async def receive(handoff: KVHandoff) -> KVHandoff:
    """The handoff with its KV as a tensor: mapped from the prefill replica's GPU memory if it
    came by CUDA IPC (a view of that memory until decode copies it into its pool)."""
    if isinstance(handoff.kv, ray.ObjectRef):
        handoff.kv = await asyncio.to_thread(ray.get, handoff.kv)
    return handoff
