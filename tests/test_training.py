"""The training recipe of the shipped models (models/train.py), at toy scale."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from popserve.models import synthvqa
from popserve.models import train as T


def test_region_labels_follow_the_scene():
    # Three objects, one per column; 3x3 grid of 32 px cells (the image-token grid of both families).
    objs = [synthvqa.Obj("red", "square", "big", 16, 16), synthvqa.Obj("blue", "circle", "small", 48, 80),
            synthvqa.Obj("green", "triangle", "big", 80, 48)]
    labels = synthvqa.region_labels(objs, 3)
    colors, sizes = list(synthvqa.COLORS), list(synthvqa.SIZES)

    def ids(o, place):
        return (colors.index(o.color) + 1, synthvqa.SHAPES.index(o.shape) + 1, sizes.index(o.size) + 1,
                synthvqa.PLACES.index(place) + 1)

    assert labels[0] == ids(objs[0], "on the left")  # row 0, column 0: the red square's centre
    assert labels[7] == ids(objs[1], "in the middle")  # row 2, column 1
    assert labels[5] == ids(objs[2], "on the right")  # row 1, column 2
    assert labels[1] == labels[3] == labels[6] == (0, 0, 0, 0)  # empty cells
    # With two objects the places are left / right, as the questions name them.
    two = synthvqa.region_labels(objs[:2], 3)
    assert two[7][3] == synthvqa.PLACES.index("on the right") + 1


def test_named_lookup_kinds_state_the_answer_in_the_text():
    """The auxiliary lookups name the object in the question; the answer names that object's key and
    the value its line in the text gives it (so they can be learned without the image)."""
    rng = random.Random(5)
    for kind in ("points_named", "owner_named") * 30:
        s = synthvqa.sample(rng, {kind: 1})
        title, *lines, question = s.question.split("\n")
        assert title in synthvqa.POINTS_TITLES + synthvqa.OWNER_TITLES and question.endswith("?")
        facts = dict(line.split(" ") for line in lines)  # one "key value" per line
        asked = re.findall(r"the (\w+)", question)[-1]  # "the red object", "the circle"
        assert asked in {getattr(o, by) for o in s.objects for by in ("color", "shape")}
        assert s.answer == f"{asked} {facts[asked]}" + (" points" if kind == "points_named" else "")
    # Never asked in the held-out sets.
    assert not {s.kind for s in synthvqa.make_dataset(200, synthvqa.HELDOUT_SEED)} & set(synthvqa.AUX_KINDS)


def test_prompt_loss_covers_the_prompt_text_only():
    """The prompt's language-model loss has targets on its text tokens, never on image tokens or on
    the answer; with weight 0 the loss is the answer loss alone."""
    torch.manual_seed(0)
    model, processor = T.build_model("gemma3", 2, seed=0)
    samples = synthvqa.make_dataset(4, 0)
    items = [T.encode_sample(processor, "gemma3", s) for s in samples]
    batch = T.collate(items, "gemma3", processor.tokenizer.pad_token_id)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    pl = batch["prompt_labels"]
    assert (pl != -100).any() and not (pl == image_id).any()
    assert not ((pl != -100) & (batch["labels"] != -100)).any()
    plain, _ = T.loss_and_acc(model, batch)
    with_prompt, _ = T.loss_and_acc(model, batch, prompt_weight=0.5)
    assert with_prompt > plain


@pytest.mark.parametrize("family", ["gemma3", "qwen3-vl"])
def test_vision_pretraining_learns_region_attributes(family):
    """Stage 0 alone: a few dozen steps take colour and place well above chance, so the image
    features carry what the questions ask about before the language model trains on them."""
    torch.manual_seed(0)
    model, processor = T.build_model(family, 2, seed=0)
    head = T.RegionHead(model.config.get_text_config().hidden_size)
    history = T.pretrain_vision(model, processor, family, head, random.Random(0), steps=80, batch_size=16,
                                lr=2e-3, warmup=10, log_every=40)
    first, last = history[0], history[-1]
    assert last["probe_loss"] < first["probe_loss"]
    assert last["probe_color_acc"] > 0.6  # chance: 1 in 5
    assert last["probe_size_acc"] > 0.7  # chance: 1 in 2


def test_two_stage_training_writes_loadable_checkpoints(tmp_path):
    """Stage 1 (vision pretraining + curriculum) and stage 2 (--init-from) at toy scale: both
    write a transformers checkpoint; the second records the first; the curriculum's image-only
    start is skipped when continuing."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    info1 = T.train("gemma3", s1, steps=6, batch_size=4, layers=2, warmup=2, log_every=3, probe_every=3,
                    vision_steps=4, max_minutes=5)
    assert info1["vision_pretrain"]["steps"] == 4 and info1["vision_pretrain"]["history"]
    assert [p["until"] for p in info1["curriculum"]] == [u for u, _ in T.CURRICULUM]
    assert all("probe_loss_swapped_images" in h for h in info1["history"] if h["step"] % 3 == 0)
    info2 = T.train("gemma3", s2, steps=4, batch_size=4, warmup=1, log_every=2, probe_every=0,
                    init_from=s1, data_seed=1, max_minutes=5)
    assert info2["vision_pretrain"]["steps"] == 0
    assert [p["until"] for p in info2["curriculum"]] == [1.0]
    assert {"scene", "points", "owner", "points_named"} <= set(info2["curriculum"][0]["kinds"])
    assert info1["prompt_loss_weight"] == T.PROMPT_LOSS_WEIGHT
    assert info2["previous_stages"][0]["steps"] == 6 and info2["data_seed"] == 1
    saved = json.loads((s2 / "training.json").read_text())
    assert saved["steps"] == 4 and saved["init_from"] == str(s1)
    model = AutoModelForImageTextToText.from_pretrained(s2)
    processor = AutoProcessor.from_pretrained(s2)
    assert model.config.get_text_config().num_hidden_layers == 2
    # The checkpoint answers through the serving path (any text: it is barely trained).
    answers = T.Answerer(s2).answer(synthvqa.make_dataset(2, synthvqa.HELDOUT_SEED))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert processor.tokenizer.pad_token_id is not None


def test_hard_kind_sampling_moves_weight_to_failing_kinds():
    errors = T.KindErrors(floor=0.1, decay=0.5)
    base = {"count": 1.0, "points": 2.0, "owner": 2.0}
    assert errors.reweight(base) == base  # nothing seen yet: every kind counts as failing
    for _ in range(10):
        errors.update(["count", "points", "owner"], [True, False, True])
    w = errors.reweight(base)
    assert w["points"] == pytest.approx(2.0, abs=1e-3)  # still failing: full weight
    assert w["count"] == pytest.approx(0.1) and w["owner"] == pytest.approx(0.2)  # mastered: the floor


def test_data_parallel_training_keeps_processes_in_sync(tmp_path):
    """Two processes (gloo) train one model on different data: the run ends with both holding the
    same weights (train checks it and raises otherwise), rank 0 writes a loadable checkpoint, and
    the record counts both processes' samples."""
    from transformers import AutoModelForImageTextToText

    info = T.train("gemma3", tmp_path / "dp", steps=4, batch_size=2, layers=2, warmup=1, log_every=2,
                   probe_every=0, vision_steps=2, max_minutes=5, procs=2)
    assert info["processes"] == 2 and info["steps"] == 4 and info["samples_seen"] == 4 * 2 * 2
    assert set(info["hard_kinds"]["final_error"]) <= set(synthvqa.QUESTION_KINDS) | set(synthvqa.AUX_KINDS)
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "dp").config.get_text_config().num_hidden_layers == 2


def test_each_process_draws_its_own_data_stream(monkeypatch):
    """Rank 0 keeps the single-process stream (so procs=1 is unchanged); other ranks draw different,
    but still seeded, samples."""
    assert T.rank_rng(0).random() == random.Random(0).random()
    monkeypatch.setattr(T, "world", lambda: (1, 2))
    a, b = T.rank_rng(0).random(), T.rank_rng(0).random()
    assert a == b != random.Random(0).random()


@pytest.mark.parametrize("family", ["qwen3-vl", "gemma3"])
def test_planted_previous_token_head(family):
    """build_model starts layer 0's first head as a previous-token head (T.PLANTED_OFFSETS), in
    both families' attention; the other heads are left as initialised."""
    model, processor = T.build_model(family, 2, seed=0)
    model.set_attn_implementation("eager")
    ids = processor.tokenizer("Points:\nred 6\nblue 3\ngreen 8\nHow many points is the red one worth?",
                              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True).attentions[0][0]  # [heads, query, key]
    previous = attn[0].diagonal(offset=-1)
    assert previous.min() > 0.99, previous
    assert attn[1].diagonal(offset=-1).mean() < 0.5  # an unplanted head is not one
