"""Prometheus metrics of the ingress, plus the stages' own numbers, refreshed at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("popserve_requests", "Chat requests by HTTP status code", ["code"], registry=r)
        self.errors = Counter("popserve_errors", "Failed requests by HTTP status code and error code",
                              ["status", "code"], registry=r)
        self.ttft = Histogram("popserve_time_to_first_token_seconds", "Time to first token", ["pop"],
                              buckets=LAT, registry=r)
        self.itl = Histogram("popserve_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=ITL, registry=r)
        self.e2e = Histogram("popserve_request_latency_seconds", "End-to-end request latency",
                             buckets=LAT, registry=r)
        # prepare: parse, fetch and tokenize; first_token: stages launched -> first token back
        # (encode + prefill + handoff + boundary step). The stages' own time: stage_busy_seconds.
        self.stage = Histogram("popserve_stage_latency_seconds", "Request phases as the ingress sees them",
                               ["stage"], buckets=LAT, registry=r)
        self.prompt_tokens = Counter("popserve_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("popserve_completion_tokens", "Generated tokens", registry=r)
        self.in_flight = Gauge("popserve_ingress_in_flight", "Requests in the ingress", registry=r)
        # Refreshed from the stages' stats() on every scrape.
        self.queue = Gauge("popserve_stage_queue_depth", "Requests queued or in flight per stage", ["stage"],
                           registry=r)
        self.running = Gauge("popserve_decode_running_sequences", "Sequences in the decode batch", registry=r)
        self.kv_in_use = Gauge("popserve_decode_kv_bytes_in_use", "KV bytes held by running sequences", registry=r)
        self.kv_pool = Gauge("popserve_decode_kv_pool_bytes", "Preallocated KV pool bytes", registry=r)
        self.skipped = Gauge("popserve_pop_layers_skipped", "Decoder layers skipped in prefill", ["deployment"],
                             registry=r)
        self.layers = Gauge("popserve_model_layers", "Decoder layers of the served model", registry=r)
        # The stages' cumulative numbers are counters (popserve_*_total), served by a collector
        # from the latest stats snapshot rather than set on gauges.
        self.stage_counters = StageCounters()
        r.register(self.stage_counters)

    def refresh(self, stats: dict[str, dict]) -> None:
        dec = stats.get("decode", {})
        for name in ("encoder", "prefill", "prefill_full"):
            if name in stats:
                self.queue.labels(name).set(stats[name].get("in_flight", 0))
        if dec:
            self.queue.labels("decode").set(dec["waiting"])
            self.running.set(dec["running"])
            self.kv_in_use.set(dec["kv_bytes_in_use"])
            self.kv_pool.set(dec["kv_pool_bytes"])
        for name in ("prefill", "prefill_full"):
            if name in stats:
                self.skipped.labels(name).set(stats[name]["skipped_layers"])
                self.layers.set(stats[name]["num_layers"])
        self.stage_counters.update(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StageCounters:
    """Custom collector: the stages' cumulative stats() values as Prometheus counters.

    The values live in the stage replicas, so the ingress cannot inc() them; it keeps the latest
    snapshot per stage (a stage that did not answer a scrape keeps its last one, as the gauges
    do) and yields CounterMetricFamily samples from it on every collect.

    A snapshot is one replica's count since that replica started, so when a replica restarts the
    value goes down (to its new count). That is fine: Prometheus reads any drop as a counter reset
    and rate()/increase() carry on from the new value. (A stage with several replicas answers each
    scrape from one of them, so its series mixes replicas and every switch to a lower one reads as
    a reset too: rate() then overcounts. As the help says, these are one replica's numbers.)
    """

    # (metric name without _total, help, stage, stats key); the exposed samples are <name>_total.
    UNLABELLED = (
        ("popserve_kv_handoff_bytes", "KV bytes handed from prefill to decode", "decode", "handoff_bytes"),
        ("popserve_kv_handoff_seconds", "Summed time from prefill end to KV in the decode pool", "decode",
         "handoff_seconds"),
        ("popserve_kv_handoffs", "KV handoffs received by decode", "decode", "handoffs"),
        ("popserve_encoder_cache_hits", "Image feature cache hits", "encoder", "cache_hits"),
    )
    BUSY = ("popserve_stage_busy_seconds", "Compute time spent by each stage (one replica)")
    BATCHES = ("popserve_stage_batches", "Batches (decode: steps) run by each stage (one replica)")

    def __init__(self):
        self._stats: dict[str, dict] = {}

    def update(self, stats: dict[str, dict]) -> None:
        self._stats = {**self._stats, **stats}

    def describe(self):  # names only, so the registry rejects a clash with another metric
        for name, doc, *_ in self.UNLABELLED:
            yield CounterMetricFamily(name, doc)
        for name, doc in (self.BUSY, self.BATCHES):
            yield CounterMetricFamily(name, doc, labels=["stage"])

    def collect(self):
        stats = self._stats
        for name, doc, stage, key in self.UNLABELLED:
            # 0 until the stage first answers, like an unlabelled prometheus_client Counter
            yield CounterMetricFamily(name, doc, value=stats.get(stage, {}).get(key, 0))
        busy, batches = (CounterMetricFamily(name, doc, labels=["stage"]) for name, doc in (self.BUSY, self.BATCHES))
        for stage, s in stats.items():
            busy.add_metric([stage], s["busy_seconds"])
            batches.add_metric([stage], s.get("batches", s.get("steps", 0)))
        yield busy
        yield batches
