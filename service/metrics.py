"""Prometheus metrics of the ingress, plus gauges refreshed from the stages at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.kv_handed = Gauge("popserve_kv_handoff_bytes_total", "KV bytes handed from prefill to decode",
                               registry=r)
        self.handoff_s = Gauge("popserve_kv_handoff_seconds_total",
                               "Summed time from prefill end to KV in the decode pool", registry=r)
        self.handoffs = Gauge("popserve_kv_handoffs_total", "KV handoffs received by decode", registry=r)
        self.skipped = Gauge("popserve_pop_layers_skipped", "Decoder layers skipped in prefill", ["deployment"],
                             registry=r)
        self.busy = Gauge("popserve_stage_busy_seconds_total", "Compute time spent by each stage (one replica)",
                          ["stage"], registry=r)
        self.batches = Gauge("popserve_stage_batches_total", "Batches (decode: steps) run by each stage (one replica)",
                             ["stage"], registry=r)
        self.layers = Gauge("popserve_model_layers", "Decoder layers of the served model", registry=r)
        self.cache_hits = Gauge("popserve_encoder_cache_hits_total", "Image feature cache hits", registry=r)

    def refresh(self, stats: dict[str, dict]) -> None:
        enc, dec = stats.get("encoder", {}), stats.get("decode", {})
        for name in ("encoder", "prefill", "prefill_full"):
            if name in stats:
                self.queue.labels(name).set(stats[name].get("in_flight", 0))
        for name, s in stats.items():
            self.busy.labels(name).set(s["busy_seconds"])
            self.batches.labels(name).set(s.get("batches", s.get("steps", 0)))
        if dec:
            self.queue.labels("decode").set(dec["waiting"])
            self.running.set(dec["running"])
            self.kv_in_use.set(dec["kv_bytes_in_use"])
            self.kv_pool.set(dec["kv_pool_bytes"])
            self.kv_handed.set(dec["handoff_bytes"])
            self.handoff_s.set(dec["handoff_seconds"])
            self.handoffs.set(dec["handoffs"])
        for name in ("prefill", "prefill_full"):
            if name in stats:
                self.skipped.labels(name).set(stats[name]["skipped_layers"])
                self.layers.set(stats[name]["num_layers"])
        if enc:
            self.cache_hits.set(enc["cache_hits"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
