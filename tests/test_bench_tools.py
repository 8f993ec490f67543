"""The GPU-node tools in bench/ (engine.py, step_profile.py) and the 8B shape they build, on what
runs here: the tiny checkpoint on the CPU, and the 8B configuration on the meta device. Also the
CPU layout comparison (cpu_layouts.py), and the load generator's workloads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from popserve.models.loading import _can_pack

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_8b_shape_is_qwen3_vl_8b():
    """make-tiny --size 8b has the real Qwen3-VL-8B's architecture (8.77B parameters)."""
    from transformers import Qwen3VLForConditionalGeneration

    from popserve.models import tiny

    config = tiny._qwen_config("8b", tiny.train_tokenizer("qwen3-vl", 1024))
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (36, 4096, 12288)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 8, 128)
    assert text.vocab_size == 151936 and text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert (vision.depth, vision.hidden_size, vision.deepstack_visual_indexes) == (27, 1152, [8, 16, 24])
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.767e9, rel=1e-3)


def test_8b_shape_is_qwen_only(tmp_path):
    from popserve.models.tiny import make_tiny

    with pytest.raises(ValueError, match="qwen3-vl"):
        make_tiny("gemma3", "8b", tmp_path)


def test_engine_bench_runs_every_request_to_length(qwen_dir, tmp_path):
    """bench/engine.py: POP on and off, text and image, every request answered with max-tokens."""
    import engine

    out = tmp_path / "engine"
    engine.main(["--model", str(qwen_dir), "--device", "cpu", "--workloads", "text48,image64",
                 "--concurrency", "1,3", "--requests", "2", "--max-tokens", "3", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["results"]
    assert set(runs) == {f"engine {m}|{w}|{c}" for m in ("POP", "POP off") for w in ("text48", "image64")
                         for c in (1, 3)}
    for key, r in runs.items():
        n = 3 if key.endswith("|3") else 2
        assert (r["requests"], r["ok"], r["errors"]) == (n, n, {}), key
        assert round(r["out_tok_s"] * r["wall_s"]) == 3 * n, key  # max-tokens each, no early stop
        assert 0 < r["ttft_p50"] <= r["e2e_p50"]
    assert report["handoff_host_round_trip"] is None  # timed on a GPU only: on a CPU it is in host memory
    assert report["skipped"] > 0 and "| engine POP off | image64 | 3 |" in out.with_suffix(".md").read_text()


def test_step_profile_times_each_step(qwen_dir, tmp_path):
    import step_profile

    out = tmp_path / "profile.md"
    step_profile.main(["--model", str(qwen_dir), "--device", "cpu", "--lengths", "40", "--batches", "1,2",
                       "--repeats", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "wall" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| prompt building (chat template + tokenizer), 40 tokens", "| prefill POP, 40 tokens",
        "| prefill POP off, 40 tokens", "| decode step, batch 1, context 40", "| decode step, batch 2, context 40",
        "| decode step, batch 2, context 40, next to a running 40-token prefill"]
    assert all(float(r.split(" | ")[1]) > 0 for r in rows)


@pytest.mark.skipif(not _can_pack(torch.bfloat16),
                    reason="oneDNN has no native bf16 on this CPU: no packed layout to compare")
def test_cpu_layouts_compares_packed_and_unpacked_runners(qwen_dir, tmp_path):
    import cpu_layouts

    out = tmp_path / "layouts.md"
    cpu_layouts.main(["--model", str(qwen_dir), "--dtype", "bfloat16", "--lengths", "24,40", "--batches", "1,3",
                      "--repeats", "1", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "ms)" not in line]
    assert [r[0] for r in rows] == [
        "| POP prefill, 24 tokens, 2 threads", "| POP prefill, 40 tokens, 2 threads",
        "| decode step, batch 1, context 24, 1 thread(s)", "| decode step, batch 3, context 24, 1 thread(s)",
        "| decode step, batch 1, context 40, 1 thread(s)", "| decode step, batch 3, context 40, 1 thread(s)"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_decode_layers_bench_times_both_layer_kinds_and_finds_equal_logits(tiny_dir, tmp_path):
    import decode_layers

    out = tmp_path / "decode-layers.md"
    decode_layers.main(["--model", str(tiny_dir), "--batches", "1,3", "--context", "20", "--steps", "2",
                        "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line[:3] in ("| 1", "| 3")]
    assert [r[0] for r in rows] == ["| 1", "| 3"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[4] == "yes |" for r in rows)


def test_detokenize_bench_checks_equal_texts_and_reports_each_length(qwen_dir, tmp_path):
    import detokenize

    out = tmp_path / "detokenize.md"
    detokenize.main(["--model", str(qwen_dir), "--lengths", "8,64", "--repeats", "1", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line[:3] in ("| 8", "| 6")]
    assert [r[0] for r in rows] == ["| 8", "| 64"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_sampler_bench_times_both_samplers_for_each_case(tmp_path):
    import sampler

    out = tmp_path / "sampler.md"
    sampler.main(["--vocab", "64,96", "--batch", "2", "--repeats", "1", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line[:4] in ("| 64", "| 96")]
    assert len(rows) == 2 * 2 * len(sampler.PARAMS)
    assert all(float(r[3].removesuffix(" ms")) > 0 and float(r[4].removesuffix(" ms")) > 0 for r in rows)


def test_request_fields_add_to_a_load_but_never_replace_what_it_sets():
    import loadgen

    assert loadgen.request_fields('{"temperature": 0.7, "top_k": 20}') == {"temperature": 0.7, "top_k": 20}
    body = loadgen.chat_body("m", "hi", None, 8, loadgen.request_fields('{"temperature": 0.7}'))
    assert body["temperature"] == 0.7 and body["max_tokens"] == 8  # greedy unless the body says otherwise
    for bad in ('{"max_tokens": 4}', '{"pop": false}', '[1]'):
        with pytest.raises(SystemExit):
            loadgen.request_fields(bad)


def test_config_ab_arms_are_validated_serve_configs():
    """bench/config_ab.py: an arm's dotted settings become nested ServeConfig overrides (JSON
    values), merged over the bench base without dropping its siblings; a misspelt one is refused."""
    import config_ab
    from pydantic import ValidationError

    from popserve.service.config import ServeConfig

    arm = config_ab.parse_arm("engine.stream_interval=4, encoder.omp_spin_count=3000,dtype=bfloat16")
    assert arm == {"engine": {"stream_interval": 4}, "encoder": {"omp_spin_count": 3000}, "dtype": "bfloat16"}
    assert config_ab.parse_arm("") == {}
    cfg = ServeConfig.model_validate(config_ab.merged({**config_ab.BASE, "model": "m"}, arm))
    assert (cfg.engine.stream_interval, cfg.engine.max_seq_len) == (4, config_ab.BASE["engine"]["max_seq_len"])
    assert (cfg.encoder.omp_spin_count, cfg.prefill.omp_spin_count, cfg.dtype) == (3000, None, "bfloat16")
    # A stage's setting keeps the stage's other defaults (decode's one thread), so an arm differs
    # from the base in what it names only.
    nice = ServeConfig.model_validate(config_ab.merged({**config_ab.BASE, "model": "m"}, config_ab.parse_arm("decode.nice=19")))
    assert nice.decode == cfg.decode.model_copy(update={"nice": 19}) and nice.decode.torch_threads == 1
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(config_ab.merged({"model": "m"}, config_ab.parse_arm("engine.stream_intervl=4")))
    assert config_ab.parse_loads("image448:8:20,text64:1:10") == [("image448", 8, 20), ("text64", 1, 10)]


def test_config_ab_report_gives_each_arm_and_its_ratio_to_the_first():
    import config_ab

    def run(tok_s, ttft):
        return {("text64", 1): {"out_tok_s": tok_s, "ttft_p50": ttft, "tpot_p50": 0.02, "itl_p50": 0.02,
                                "itl_p90": 0.03, "handoff_ms": ttft * 10, "decode_batch": tok_s / 2, "idle_pct": 5.0,
                                "cpu_ms_per_token": dict.fromkeys([*config_ab.PROCESSES, "loadgen", "rest"], 2.0)}}

    runs = {"": [run(10.0, 0.5), run(12.0, 0.7)], "engine.stream_interval=4": [run(15.0, 0.3), run(13.0, 0.3)]}
    text = config_ab.report(runs, [("text64", 1, 2)], "header")
    rows = [line for line in text.splitlines() if line.startswith("| text64, 1 client |")]
    assert [r.split(" | ")[1] for r in rows] == ["default", "`engine.stream_interval=4`",
                                                 "`engine.stream_interval=4` / default"]
    assert "| 11.0 | 600 |" in rows[0] and "| 14.0 | 300 |" in rows[1]  # medians of the two rounds
    assert "| 6.0 | 5.5 | 5 |" in rows[0] and "| 3.0 | 7.0 | 5 |" in rows[1]  # handoff ms, decode batch, idle %
    assert "| 1.27x | 0.50x | 1.00x | | 0.50x | 1.27x | |" in rows[2]  # tok/s, TTFT, TPOT, handoff, batch
    assert rows[0].count("| 2.00 ") == len(config_ab.PROCESSES) + 2  # each stage's CPU, the load generator's, the rest's


def test_config_ab_counts_the_rest_of_the_machine_and_the_decode_batch():
    import config_ab

    stages = dict.fromkeys([*config_ab.PROCESSES, "loadgen"], 1.0)
    before = {**stages, "busy": 10.0, "idle": 100.0}
    after = {**dict.fromkeys([*config_ab.PROCESSES, "loadgen"], 2.0), "busy": 18.0, "idle": 101.0}  # 6 s of 8 busy
    stats = {"handoffs": 3, "handoff_seconds": 1.0, "steps": 10, "tokens_out": 100}
    later = {"handoffs": 7, "handoff_seconds": 1.2, "steps": 30, "tokens_out": 260}
    got = config_ab.load_counters(before, after, stats, later, tokens=1000, wall_s=4.0)
    assert got["cpu_ms_per_token"]["Decode"] == got["cpu_ms_per_token"]["loadgen"] == 1.0 and abs(got["cpu_ms_per_token"]["rest"] - 2.0) < 1e-9
    assert abs(got["handoff_ms"] - 50.0) < 1e-9 and got["decode_batch"] == 8.0
    import psutil
    assert abs(got["idle_pct"] - 100 / (4.0 * psutil.cpu_count())) < 1e-9


def test_every_bench_script_compiles_on_this_python():
    """The scripts run by hand, not in CI: at least they must parse here (a quote reused inside an
    f-string parses only from Python 3.12 on)."""
    for path in sorted(BENCH.glob("*.py")):
        compile(path.read_text(), str(path), "exec")


def test_prefix_sharing_workloads_share_their_start_and_end_apart(qwen_dir):
    from transformers import AutoTokenizer

    import loadgen

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    a, b = loadgen.bodies_for("shared300", "m", tok, 2, 0, 4)
    assert a["messages"][0] == b["messages"][0] and a["messages"][0]["role"] == "system"
    assert 250 <= len(tok(a["messages"][0]["content"])["input_ids"]) <= 310
    assert a["messages"][1]["content"] != b["messages"][1]["content"]
    c, d = loadgen.bodies_for("sameimage64", "m", tok, 2, 0, 4)
    (ci, ct), (di, dt) = c["messages"][0]["content"], d["messages"][0]["content"]
    assert ci == di and ct != dt
    e, f = loadgen.bodies_for("image64", "m", tok, 2, 0, 4)
    assert e["messages"][0]["content"][0] != f["messages"][0]["content"][0]  # unique images
    assert loadgen.sharing_note(["text512", "image448"]) == "unique prompts/images"
    assert "sameimage64" in loadgen.sharing_note(["text512", "sameimage64"])
