"""/metrics types, without a server: the stages' cumulative numbers are counters, the rest gauges.

Metrics.refresh() is fed a stats dict shaped like what Ingress.stage_stats() returns (one dict per
stage, each the stage's stats(): service/deployments/{encoder,prefill,decode}.py, the decode one
being Scheduler.stats() plus param_bytes, all plus replica_info()). The fixture's keys are checked
against those stats() sources, so the fixture cannot drift from what the stages really send.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from popserve.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]

REPLICA = {"pid": 4242, "torch_threads": 4, "omp_wait_policy": "PASSIVE", "omp_spin_count": None,
           "malloc_trim_threshold": "1048576", "nice": 0}


def stage_stats(prefill_full: bool = True) -> dict[str, dict]:
    def prefill(skipped, busy, batches):
        return {"prompts": 7, "batches": batches, "tokens": 9000, "busy_seconds": busy, "in_flight": 1,
                "handoff_bytes": 123456, "batch_token_budget": 8192, "largest_batch_tokens": 4096,
                "largest_batch_prompts": 2, "skipped_layers": skipped, "num_layers": 4, "pop_ratio": 0.5,
                "param_bytes": 10_000, **REPLICA}

    stats = {
        "encoder": {"images": 5, "batches": 3, "busy_seconds": 0.75, "cache_hits": 2, "cache_misses": 3,
                    "cache_bytes": 4096, "param_bytes": 2000, "in_flight": 0, **REPLICA},
        "prefill": prefill(2, 1.5, 6),
        "decode": {"running": 3, "waiting": 2, "prefilling": 1, "kv_bytes_in_use": 65536,
                   "kv_pool_bytes": 1 << 20, "steps": 40, "busy_seconds": 2.25, "tokens_out": 120,
                   "handoffs": 8, "handoff_bytes": 987654, "handoff_seconds": 0.125, "param_bytes": 30_000,
                   **REPLICA},
    }
    if prefill_full:
        stats["prefill_full"] = prefill(0, 0.5, 4)
    return stats


# The six cumulative families: name (as the parser reports it, without _total) -> {labels: value}
# for stage_stats() above.
COUNTERS = {
    "popserve_kv_handoff_bytes": {(): 987654},
    "popserve_kv_handoff_seconds": {(): 0.125},
    "popserve_kv_handoffs": {(): 8},
    "popserve_encoder_cache_hits": {(): 2},
    "popserve_stage_busy_seconds": {(("stage", "encoder"),): 0.75, (("stage", "prefill"),): 1.5,
                                    (("stage", "decode"),): 2.25, (("stage", "prefill_full"),): 0.5},
    "popserve_stage_batches": {(("stage", "encoder"),): 3, (("stage", "prefill"),): 6,
                               (("stage", "decode"),): 40, (("stage", "prefill_full"),): 4},
}
GAUGES = ("popserve_stage_queue_depth", "popserve_decode_running_sequences", "popserve_decode_kv_bytes_in_use",
          "popserve_decode_kv_pool_bytes", "popserve_pop_layers_skipped", "popserve_model_layers",
          "popserve_ingress_in_flight")


def scrape(metrics: Metrics, stats: dict | None = None) -> tuple[str, dict]:
    if stats is not None:
        metrics.refresh(stats)
    text = metrics.render().decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def samples(family) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def assert_no_total_gauges(families: dict) -> None:
    """promtool is not installed here; this is the rule it lints for: `_total` belongs to counters."""
    bad = [name for name, f in families.items() if f.type != "counter" and
           (name.endswith("_total") or any(s.name.endswith("_total") for s in f.samples))]
    assert not bad, f"non-counter families with _total names: {bad}"


# ---- the fixture is what the stages send ----------------------------------------------------------
def _dict_keys(path: str, func: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    return {k.value for d in ast.walk(fn) if isinstance(d, ast.Dict) for k in d.keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def test_fixture_has_the_keys_the_stages_report():
    stats = stage_stats()
    replica = _dict_keys("service/deployments/common.py", "replica_info")
    assert replica == set(REPLICA)
    expected = {
        "encoder": _dict_keys("service/deployments/encoder.py", "stats"),
        "prefill": _dict_keys("service/deployments/prefill.py", "stats"),
        "decode": (_dict_keys("service/engine/scheduler.py", "stats")
                   | _dict_keys("service/deployments/decode.py", "stats")),
    }
    for stage, keys in expected.items():
        assert set(stats[stage]) == keys | replica, stage
    assert set(stats["prefill_full"]) == set(stats["prefill"])  # the same deployment class


# ---- types ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill_full", [True, False])
def test_cumulative_stage_values_are_counters(prefill_full):
    text, families = scrape(Metrics(), stage_stats(prefill_full))
    for name, want in COUNTERS.items():
        if not prefill_full:
            want = {k: v for k, v in want.items() if k != (("stage", "prefill_full"),)}
        f = families[name]
        assert f.type == "counter", name
        assert {s.name for s in f.samples} == {f"{name}_total"}, name  # no _created: not known here
        assert samples(f) == pytest.approx(want), name
        # the exposed lines keep the names dashboards and bench/serve.py read
        assert f"# TYPE {name}_total counter" in text
    assert "popserve_kv_handoff_bytes_total 987654.0" in text.splitlines()
    assert 'popserve_stage_busy_seconds_total{stage="decode"} 2.25' in text.splitlines()


def test_gauges_stay_gauges():
    _, families = scrape(Metrics(), stage_stats())
    for name in GAUGES:
        assert families[name].type == "gauge", name
    assert samples(families["popserve_stage_queue_depth"]) == {
        (("stage", "encoder"),): 0, (("stage", "prefill"),): 1, (("stage", "prefill_full"),): 1,
        (("stage", "decode"),): 2}
    assert samples(families["popserve_decode_running_sequences"]) == {(): 3}
    assert samples(families["popserve_decode_kv_bytes_in_use"]) == {(): 65536}
    assert samples(families["popserve_decode_kv_pool_bytes"]) == {(): 1 << 20}
    assert samples(families["popserve_pop_layers_skipped"]) == {
        (("deployment", "prefill"),): 2, (("deployment", "prefill_full"),): 0}
    assert samples(families["popserve_model_layers"]) == {(): 4}


def test_no_gauge_is_named_total():
    m = Metrics()
    # exercise the ingress-side metrics too, so every family has samples
    m.requests.labels("200").inc()
    m.errors.labels("400", "invalid_request_error").inc()
    m.ttft.labels("true").observe(0.1)
    m.itl.observe(0.01)
    m.e2e.observe(0.2)
    m.stage.labels("prepare").observe(0.01)
    m.prompt_tokens.inc(10)
    m.completion_tokens.inc(3)
    for stats in (None, stage_stats()):
        _, families = scrape(m, stats)
        assert_no_total_gauges(families)
        assert {n for n, f in families.items() if f.type == "counter"} >= set(COUNTERS)


# ---- behaviour over successive scrapes ------------------------------------------------------------
def test_before_any_stats_and_when_a_stage_does_not_answer():
    m = Metrics()
    _, families = scrape(m)
    for name in ("popserve_kv_handoff_bytes", "popserve_kv_handoff_seconds", "popserve_kv_handoffs",
                 "popserve_encoder_cache_hits"):
        assert families[name].type == "counter" and samples(families[name]) == {(): 0}, name
    assert samples(families["popserve_stage_busy_seconds"]) == {}

    scrape(m, stage_stats())
    # stage_stats() drops a stage whose stats() failed or timed out: its last values stay exported
    partial = {k: v for k, v in stage_stats().items() if k != "decode"}
    partial["encoder"] = {**partial["encoder"], "cache_hits": 9, "busy_seconds": 1.0}
    _, families = scrape(m, partial)
    assert samples(families["popserve_kv_handoffs"]) == {(): 8}
    assert samples(families["popserve_encoder_cache_hits"]) == {(): 9}
    assert samples(families["popserve_stage_busy_seconds"])[(("stage", "decode"),)] == 2.25
    assert samples(families["popserve_stage_busy_seconds"])[(("stage", "encoder"),)] == 1.0


def test_replica_restart_is_exported_as_a_counter_reset():
    m = Metrics()
    scrape(m, stage_stats())
    restarted = stage_stats()
    restarted["decode"] = {**restarted["decode"], "handoffs": 1, "handoff_bytes": 100, "steps": 2, "pid": 5151}
    _, families = scrape(m, restarted)
    # the new replica's count, lower than before: Prometheus reads the drop as a reset
    assert families["popserve_kv_handoffs"].type == "counter"
    assert samples(families["popserve_kv_handoffs"]) == {(): 1}
    assert samples(families["popserve_kv_handoff_bytes"]) == {(): 100}
    assert samples(families["popserve_stage_batches"])[(("stage", "decode"),)] == 2


def test_stage_counters_names_are_registered():
    """The collector describes its names, so a clashing metric on the same registry is refused."""
    from prometheus_client import Counter

    m = Metrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("popserve_kv_handoffs", "clash", registry=m.registry)


def test_the_ingress_uses_only_what_metrics_has():
    """Ingress code calls refresh(stats), render() and the ingress-side metrics; all still there."""
    used = set(re.findall(r"self\.metrics\.(\w+)", (ROOT / "service" / "ingress.py").read_text()))
    assert {"refresh", "render", "requests", "errors"} <= used
    m = Metrics()
    missing = [name for name in used if not hasattr(m, name)]
    assert not missing, missing
