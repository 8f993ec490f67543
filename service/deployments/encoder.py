"""VisionEncoder deployment: batches images across concurrent requests, caches features by content."""
from __future__ import annotations

import asyncio
import collections
import time

from ray import serve

from popserve.models.encoder import VisionEncoder
from popserve.models.families import ImageFeatures, PixelInputs

from ..config import ServeConfig
from ..metrics import StageMetrics
from .common import replica_info, setup_replica


class FeatureCache:
    """LRU of image features keyed by image content hash, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: collections.OrderedDict[str, ImageFeatures] = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str):
        feat = self.items.get(key)
        if feat is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return feat

    def put(self, key: str, feat: ImageFeatures) -> None:
        if feat.nbytes > self.max_bytes or key in self.items:
            return
        self.items[key] = feat
        self.bytes += feat.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes


@serve.deployment
class VisionEncoderStage:
    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        setup_replica(self.cfg, self.cfg.encoder)
        self.runner = VisionEncoder(self.cfg.model, self.cfg.dtype, self.cfg.device)
        self.cache = FeatureCache(self.cfg.encoder_cache_bytes)
        self.images = self.batches = self.in_flight = 0
        self.busy_s = 0.0
        self.metrics = StageMetrics("encoder", self.stats)

    async def encode(self, items: list[tuple[str, PixelInputs]]) -> list[ImageFeatures]:
        """One request's images (digest, pixels) -> features in the same order."""
        out = [self.cache.get(digest) for digest, _ in items]
        todo = [i for i, f in enumerate(out) if f is None]
        self.in_flight += len(todo)
        try:
            fresh = await asyncio.gather(*(self._encode_one(items[i][1]) for i in todo))
        finally:
            self.in_flight -= len(todo)
        for i, feat in zip(todo, fresh):
            feat.key = items[i][0]  # the image's identity for the prefill's prefix cache
            self.cache.put(items[i][0], feat)
            out[i] = feat
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_one(self, pixels: list[PixelInputs]) -> list[ImageFeatures]:
        t0 = time.perf_counter()
        feats = await asyncio.to_thread(self.runner.encode_pixels, pixels)
        self.busy_s += time.perf_counter() - t0
        self.images += len(pixels)
        self.batches += 1
        return feats

    def stats(self) -> dict:  # "pid": operators (and tests) can tell replicas apart
        return {"images": self.images, "batches": self.batches, "busy_seconds": self.busy_s,
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_bytes": self.cache.bytes, "param_bytes": self.runner.param_bytes(),
                "in_flight": self.in_flight, **replica_info()}

    def ready(self) -> bool:
        return True
