"""Metrics without a server: what the stages export, and what GET /metrics keeps of Ray's exposition.

The servers' tests check the real path (replicas -> Ray's agent -> /metrics):
tests/test_service.py::test_health_models_metrics (names, types, labels, one application) and
tests/test_reliability_limits.py::test_metrics_add_up_over_replicas (two prefill replicas).
"""
from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from popserve.service.metrics import STAGE_COUNTERS, STAGE_GAUGES, popserve_samples

ROOT = Path(__file__).resolve().parents[1]
# Where each stage kind's stats() is written (StageMetrics reads decode's from the scheduler;
# prefill's takes in its prefix cache's).
STATS_SOURCES = {"encoder": [("service/deployments/encoder.py", "stats")],
                 "prefill": [("service/deployments/prefill.py", "stats"), ("models/prefix_cache.py", "stats")],
                 "decode": [("service/engine/scheduler.py", "stats")]}


def _dict_keys(path: str, func: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    return {k.value for d in ast.walk(fn) if isinstance(d, ast.Dict) for k in d.keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def test_every_exported_key_is_one_its_stage_reports():
    reported = {kind: set().union(*(_dict_keys(*w) for w in where)) for kind, where in STATS_SOURCES.items()}
    for name, _, keys in STAGE_GAUGES + STAGE_COUNTERS:
        for kind, key in keys.items():
            assert key in reported[kind], f"{name}: {kind}'s stats() has no {key!r}"


def test_names_leave_the_suffixes_to_the_exporter():
    """Ray's exporter adds _total to counters; a gauge named _total breaks Prometheus' rules."""
    for name, _, _ in STAGE_GAUGES + STAGE_COUNTERS:
        assert name.startswith("popserve_") and not name.endswith("_total"), name


# What a Ray 2.60 metrics agent serves (abridged): two applications' samples, Ray's own metrics
# and Ray's process labels on every sample.
RAY_LABELS = ('Component="core_worker",NodeAddress="10.0.0.5",SessionName="session_1",Version="2.60.0",'
              'WorkerId="ab12",otel_scope_name="ray",otel_scope_schema_url="",otel_scope_version=""')
EXPOSITION = f"""# HELP ray_popserve_kv_handoffs_total KV handoffs received by decode
# TYPE ray_popserve_kv_handoffs_total counter
ray_popserve_kv_handoffs_total{{{RAY_LABELS},application="qwen",deployment="Decode",replica="r1",stage="decode"}} 8.0
ray_popserve_kv_handoffs_total{{{RAY_LABELS},application="qwen",deployment="Decode",replica="r2",stage="decode"}} 5.0
ray_popserve_kv_handoffs_total{{{RAY_LABELS},application="other",deployment="Decode",replica="r9",stage="decode"}} 99.0
# HELP ray_popserve_decode_running_sequences Sequences in this replica's decode batch
# TYPE ray_popserve_decode_running_sequences gauge
ray_popserve_decode_running_sequences{{{RAY_LABELS},application="qwen",deployment="Decode",replica="r1",stage="decode"}} 3.0
# HELP ray_popserve_time_to_first_token_seconds Time to first token
# TYPE ray_popserve_time_to_first_token_seconds histogram
ray_popserve_time_to_first_token_seconds_bucket{{{RAY_LABELS},application="qwen",deployment="Ingress",le="0.5",pop="true",replica="i1"}} 1.0
ray_popserve_time_to_first_token_seconds_bucket{{{RAY_LABELS},application="qwen",deployment="Ingress",le="+Inf",pop="true",replica="i1"}} 2.0
ray_popserve_time_to_first_token_seconds_count{{{RAY_LABELS},application="qwen",deployment="Ingress",pop="true",replica="i1"}} 2.0
ray_popserve_time_to_first_token_seconds_sum{{{RAY_LABELS},application="qwen",deployment="Ingress",pop="true",replica="i1"}} 0.9
# HELP ray_popserve_encoder_cache_hits_total Image feature cache hits
# TYPE ray_popserve_encoder_cache_hits_total counter
ray_popserve_encoder_cache_hits_total{{{RAY_LABELS},application="other",deployment="VisionEncoder",replica="e9",stage="encoder"}} 4.0
# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{{{RAY_LABELS},application="qwen",method="POST",route="/qwen"}} 12.0
"""


def test_metrics_keeps_one_applications_popserve_samples():
    text = popserve_samples(EXPOSITION, "qwen").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # the other application's families and samples, and Ray's own metrics, are left out
    assert set(families) == {"ray_popserve_kv_handoffs", "ray_popserve_decode_running_sequences",
                             "ray_popserve_time_to_first_token_seconds"}
    handoffs = families["ray_popserve_kv_handoffs"]
    assert handoffs.type == "counter"
    assert {s.labels["replica"]: s.value for s in handoffs.samples} == {"r1": 8.0, "r2": 5.0}
    assert families["ray_popserve_decode_running_sequences"].type == "gauge"
    ttft = families["ray_popserve_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert {(s.name, s.labels.get("le")): s.value for s in ttft.samples} == {
        ("ray_popserve_time_to_first_token_seconds_bucket", "0.5"): 1.0,
        ("ray_popserve_time_to_first_token_seconds_bucket", "+Inf"): 2.0,
        ("ray_popserve_time_to_first_token_seconds_count", None): 2.0,
        ("ray_popserve_time_to_first_token_seconds_sum", None): 0.9}
    # what a sample is stays (Serve's labels and ours); Ray's process labels go
    assert {k for f in families.values() for s in f.samples for k in s.labels} == {
        "application", "deployment", "replica", "stage", "le", "pop"}
    assert "# TYPE ray_popserve_kv_handoffs_total counter" in text


def test_metrics_of_an_application_with_no_samples_yet():
    assert popserve_samples(EXPOSITION, "not-deployed") == b""
