"""popserve's Prometheus metrics, recorded in the replica where they happen.

Every replica records its own numbers through Ray Serve's metrics API, which tags each sample with
its deployment, replica and application; each node's Ray metrics agent exports them as
`ray_popserve_*` on Ray's metrics port (8080 on KubeRay). So a stage with several replicas, on
several nodes, adds up exactly (`sum by (stage)` in PromQL), which one process asking one replica
of each stage could not do. The Ingress's GET /metrics serves what its own node's agent exports
for its application: on one node (`popserve serve`), every replica's.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics as serve_metrics

logger = logging.getLogger("ray.serve")

# Ray's exporter rebuilds a histogram's _sum from its buckets' midpoints, so _sum / _count (a mean)
# is only as exact as the buckets are narrow; quantiles are bucket-based anyway.
LAT = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10,
       15, 20, 30, 60)
ITL = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
PREFIX = "ray_popserve_"  # Ray's exporter puts "ray_" before every application metric's name
# Labels Ray's exporter puts on every sample to say which process sent it (plus otel_scope_*);
# /metrics leaves them out: Serve's replica label already says it.
RAY_PROCESS_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
# Ray's agent drops a gauge that nobody set within two of its collection intervals (so a dead
# replica's go away); every export sets them again.
GAUGE_REFRESH_S = 1.0


def every(interval_s: float, export: Callable[[], None]) -> asyncio.Task:
    """export() now and then every interval_s on this replica's event loop (a replica's __init__
    runs on it), until the replica stops. A failed export is logged; the next one tries again."""
    async def loop():
        while True:
            try:
                export()
            except Exception:
                logger.exception("exporting metrics failed")
            await asyncio.sleep(interval_s)

    return asyncio.get_running_loop().create_task(loop())


class IngressMetrics:
    """The requests as the Ingress replica sees them."""

    def __init__(self):
        C, G, H = serve_metrics.Counter, serve_metrics.Gauge, serve_metrics.Histogram
        self.requests = C("popserve_requests", "Chat requests by HTTP status code", ("code",))
        self.errors = C("popserve_errors", "Failed requests by HTTP status code and error code", ("status", "code"))
        self.ttft = H("popserve_time_to_first_token_seconds", "Time to first token", LAT, ("pop",))
        self.itl = H("popserve_inter_token_latency_seconds", "Time between streamed tokens", ITL)
        self.e2e = H("popserve_request_latency_seconds", "End-to-end request latency", LAT)
        # prepare: parse, fetch and tokenize; first_token: stages launched -> first token back
        # (encode + prefill + handoff + boundary step). The stages' own time: stage_busy_seconds.
        self.phase = H("popserve_stage_latency_seconds", "Request phases as the ingress sees them", LAT, ("stage",))
        self.prompt_tokens = C("popserve_prompt_tokens", "Prompt tokens")
        self.completion_tokens = C("popserve_completion_tokens", "Generated tokens")
        self._in_flight, self._in_flight_gauge = 0, G("popserve_ingress_in_flight", "Requests in this ingress replica")
        self.task = every(GAUGE_REFRESH_S, lambda: self._in_flight_gauge.set(self._in_flight))

    def request_done(self, status: int, error_code: str = "") -> None:
        self.requests.inc(tags={"code": str(status)})
        if error_code:
            self.errors.inc(tags={"status": str(status), "code": error_code})

    def in_flight(self, delta: int) -> None:
        self._in_flight += delta
        self._in_flight_gauge.set(self._in_flight)


# A stage replica's stats() keys, exported by StageMetrics: (name, help, {stage kind: stats key}).
# Stage kinds: encoder, prefill (prefill_full too: the same class), decode. Every sample also has
# the label stage (prefill_full apart from prefill) and Serve's replica.
STAGE_GAUGES = (
    ("popserve_stage_queue_depth", "Requests in flight (decode: waiting for a slot) in this replica",
     {"encoder": "in_flight", "prefill": "in_flight", "decode": "waiting"}),
    ("popserve_decode_running_sequences", "Sequences in this replica's decode batch", {"decode": "running"}),
    ("popserve_decode_kv_bytes_in_use", "KV bytes held by running sequences", {"decode": "kv_bytes_in_use"}),
    ("popserve_decode_kv_pool_bytes", "Preallocated KV pool bytes", {"decode": "kv_pool_bytes"}),
    ("popserve_pop_layers_skipped", "Decoder layers this prefill skips", {"prefill": "skipped_layers"}),
    ("popserve_model_layers", "Decoder layers of the served model", {"prefill": "num_layers"}),
    ("popserve_prefix_cache_bytes", "KV bytes held by this prefill replica's prefix cache",
     {"prefill": "prefix_cache_bytes"}),
)
STAGE_COUNTERS = (
    ("popserve_stage_busy_seconds", "Compute time of the stage's replica",
     {"encoder": "busy_seconds", "prefill": "busy_seconds", "decode": "busy_seconds"}),
    ("popserve_stage_batches", "Batches (decode: steps) run by the stage's replica",
     {"encoder": "batches", "prefill": "batches", "decode": "steps"}),
    ("popserve_prefill_prompts", "Prompts prefilled", {"prefill": "prompts"}),
    ("popserve_kv_handoff_bytes", "KV bytes handed from prefill to decode (counted by decode)",
     {"decode": "handoff_bytes"}),
    ("popserve_kv_handoff_seconds", "Summed time from prefill end to KV in the decode pool",
     {"decode": "handoff_seconds"}),
    ("popserve_kv_handoffs", "KV handoffs received by decode", {"decode": "handoffs"}),
    ("popserve_encoder_cache_hits", "Image feature cache hits", {"encoder": "cache_hits"}),
    ("popserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
     {"prefill": "prefix_cache_queried_tokens"}),
    ("popserve_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache",
     {"prefill": "prefix_cache_hit_tokens"}),
)


class StageMetrics:
    """Exports a stage replica's stats() every `interval_s`: gauges are set, counters grow by the
    difference since the last export. stats() stays the one place a stage counts things."""

    def __init__(self, stage: str, stats: Callable[[], dict], interval_s: float = GAUGE_REFRESH_S):
        kind = "prefill" if stage == "prefill_full" else stage
        self.stats = stats
        self.gauges = [(serve_metrics.Gauge(n, h, ("stage",)), keys[kind])
                       for n, h, keys in STAGE_GAUGES if kind in keys]
        self.counters = [(serve_metrics.Counter(n, h, ("stage",)), keys[kind])
                         for n, h, keys in STAGE_COUNTERS if kind in keys]
        for metric, _ in self.gauges + self.counters:
            metric.set_default_tags({"stage": stage})
        self.exported: dict[str, float] = {}
        self.task = every(interval_s, self.export)

    def export(self) -> None:
        s = self.stats()
        for gauge, key in self.gauges:
            gauge.set(s[key])
        for counter, key in self.counters:
            grown = s[key] - self.exported.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self.exported[key] = s[key]


# ---- GET /metrics -------------------------------------------------------------------------------
def node_metrics_url() -> str:
    """This node's Ray metrics agent: where the samples of every replica on this node are."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def popserve_samples(exposition: str, application: str) -> bytes:
    """The popserve families of one application out of a Ray metrics agent's exposition, without
    Ray's process labels (every label that says what a sample is stays)."""
    def keep(label: str) -> bool:
        return label not in RAY_PROCESS_LABELS and not label.startswith("otel_scope_")

    def families():
        for family in text_string_to_metric_families(exposition):
            if not family.name.startswith(PREFIX):
                continue
            family.samples = [s._replace(labels={k: v for k, v in s.labels.items() if keep(k)})
                              for s in family.samples if s.labels.get("application") == application]
            if family.samples:
                yield family

    class Snapshot:
        def collect(self):
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


async def scrape_node(url: str, application: str, timeout_s: float = 10.0) -> bytes:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.get(url)
        response.raise_for_status()
    return popserve_samples(response.text, application)
