"""The training recipe of the shipped models (models/train.py), at toy scale."""
from __future__ import annotations

import json
import random

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
    assert {"scene", "points", "owner"} <= set(info2["curriculum"][0]["kinds"])
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
