"""Bad checkpoints fail loudly (CheckpointError naming the problem) in every stage that reads them,
and `popserve make-tiny` writes a checkpoint transformers loads offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from popserve.models.checkpoint import CheckpointError  # noqa: E402
from popserve.models.decoder import FullDecoder  # noqa: E402
from popserve.models.encoder import VisionEncoder  # noqa: E402
from popserve.models.prefill import PrunedPrefill  # noqa: E402
from popserve.models.prompt import PromptBuilder  # noqa: E402

STAGES = {
    "prompt": PromptBuilder,
    "encoder": VisionEncoder,
    "prefill": PrunedPrefill,
    "decoder": lambda d: FullDecoder(d, max_seqs=1, max_seq_len=16),
}
# PromptBuilder reads no weights, so weight-file problems are not its to report.
WEIGHT_PROBLEMS = {"truncated_data", "truncated_header", "no_weights"}


@pytest.fixture(scope="module")
def bad_dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    src = tiny_dirs["gemma3"]

    def copy(name, family_src=src):
        dst = root / name
        shutil.copytree(family_src, dst)
        return dst

    out = {"missing": (root / "does-not-exist", "does not exist")}

    d = copy("no_config")
    (d / "config.json").unlink()
    out["no_config"] = (d, "has no config.json")

    d = copy("corrupt_config")
    (d / "config.json").write_text('{"model_type": "gemma3", "text_config": {')
    out["corrupt_config"] = (d, "is not valid JSON")

    d = copy("config_not_object")
    (d / "config.json").write_text("null")
    out["config_not_object"] = (d, "config.json")

    d = copy("truncated_data", tiny_dirs["qwen3-vl"])
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out["truncated_data"] = (d, "model.safetensors is truncated")

    d = copy("truncated_header")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00")
    out["truncated_header"] = (d, "model.safetensors is truncated")

    d = copy("no_weights")
    (d / "model.safetensors").unlink()
    out["no_weights"] = (d, "no weight files")

    d = copy("llama", tiny_dirs["qwen3-vl"])
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    out["unsupported"] = (d, "unsupported model_type 'llama'")

    f = root / "a_file"
    f.write_text("x")
    out["file"] = (f, "is a file")
    return out


PROBLEMS = ["missing", "no_config", "corrupt_config", "config_not_object", "truncated_data",
            "truncated_header", "no_weights", "unsupported", "file"]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_checkpoint_raises_checkpoint_error(bad_dirs, stage, problem):
    if stage == "prompt" and problem in WEIGHT_PROBLEMS:
        pytest.skip("PromptBuilder does not read weights")
    path, needle = bad_dirs[problem]
    with pytest.raises(CheckpointError) as err:
        STAGES[stage](path)
    msg = str(err.value)
    assert needle in msg, msg
    if problem != "missing":
        assert str(path) in msg, msg  # says which checkpoint


def test_unsupported_message_lists_supported_families(bad_dirs):
    path, _ = bad_dirs["unsupported"]
    with pytest.raises(CheckpointError, match="qwen3_vl") as err:
        PrunedPrefill(path)
    assert "gemma3" in str(err.value)


# ---- 9. the make-tiny command -----------------------------------------------------------------
def test_make_tiny_cli_writes_loadable_gemma3(tmp_path):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    from popserve.models.tiny import GEMMA_SPECIALS

    exe = Path(sys.executable).with_name("popserve")
    assert exe.exists(), f"console script missing: {exe}"
    out = tmp_path / "tiny-gemma3"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(exe), "make-tiny", "--family", "gemma3", "--size", "tiny", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gemma3" in proc.stdout and str(out) in proc.stdout
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()

    processor = AutoProcessor.from_pretrained(out)
    model = Gemma3ForConditionalGeneration.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "gemma3" and cfg.text_config.num_hidden_layers == 6
    assert cfg.text_config.sliding_window == 8 and cfg.text_config.layer_types[-1] == "full_attention"

    tok = processor.tokenizer
    for t in GEMMA_SPECIALS:  # each a single, real token of the vocabulary
        tid = tok.convert_tokens_to_ids(t)
        assert tid is not None and tid < len(tok)
        assert tok.encode(t, add_special_tokens=False) == [tid], t
        assert t in tok.all_special_tokens or t in tok.get_added_vocab(), t
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    # Gemma-3: prompts carry <start_of_image>; the processor expands it to soft tokens.
    assert processor.image_token == processor.boi_token == "<start_of_image>"
    assert tok.image_token == "<image_soft_token>" and tok.eoi_token == "<end_of_image>"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>")
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in (eos if isinstance(eos, list) else [eos])

    # Chat template: family's turn markers and an image placeholder where the image part is.
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"},
                                         {"type": "text", "text": "what is it"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nlook<start_of_image>what is it<end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\n")
    from PIL import Image

    batch = processor(text=[text], images=[Image.new("RGB", (40, 30), (10, 200, 30))], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(cfg.image_token_id) == cfg.mm_tokens_per_image == 16
    assert ids.count(tok.convert_tokens_to_ids("<start_of_image>")) == 1
    assert ids.count(tok.convert_tokens_to_ids("<end_of_image>")) == 1
    assert batch["pixel_values"].shape[-2:] == (64, 64)
