"""SynthVQA: synthetic visual question answering about simple shapes, generated in code.

Each sample is one 96x96 RGB image with 1-3 shapes (colour, shape, size, left-to-right order) and
a question in one of several phrasings with a short (often multi-token) answer. Some questions
need the image *and* facts stated in the text ("Points:\nred 3\nblue 5\nHow many points is the
object on the left worth?" -> "blue 5 points"), so the prompt's encoding matters.

Everything is a pure function of the seed: `make_dataset(n, seed)` returns the same samples on
every machine. Training uses seed 0 (streamed), the held-out sets other seeds (see HELDOUT_SEED).
"""
from __future__ import annotations

import base64
import io
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 15, "big": 27}
NUMBERS = ["zero", "one", "two", "three", "four"]
NAMES = ["tom", "ann", "max", "eva", "sam", "lea", "ben", "mia"]
SLOT_WORDS = {1: ["in the middle"], 2: ["on the left", "on the right"],
              3: ["on the left", "in the middle", "on the right"]}

HELDOUT_SEED = 1234  # the held-out set of the tests and docs (50 questions)
EVAL_SEED = 777  # the held-out set of the POP tables
DEMO_SEED = 42


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    x: int
    y: int

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    objects: list[Obj] = field(default_factory=list)

    def messages(self) -> list[dict]:
        """HF-style chat messages (one image placeholder, then the question)."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]

    def openai_messages(self) -> list[dict]:
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(self.image)}},
            {"type": "text", "text": self.question}]}]


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def normalize(text: str) -> str:
    """The accuracy metric's normalisation: strip, lowercase, drop trailing punctuation."""
    return text.strip().lower().rstrip(string.punctuation).strip()


def is_correct(generated: str, answer: str) -> bool:
    return normalize(generated) == normalize(answer)


# ---- scenes ----------------------------------------------------------------------------------
def _scene(rng: random.Random) -> list[Obj]:
    n = rng.choice([1, 2, 2, 3, 3, 3])
    colors = rng.sample(list(COLORS), n)
    slots = sorted(rng.sample(range(3), n))  # three columns of 32 px: left-to-right order is clear
    objs = []
    for c, s in zip(colors, slots):
        size = rng.choice(list(SIZES))
        half = SIZES[size] // 2
        jitter = max(0, 16 - half - 2)
        x = s * 32 + 16 + rng.randint(-jitter, jitter)
        y = rng.randint(half + 4, IMAGE_SIZE - half - 5)
        objs.append(Obj(c, rng.choice(SHAPES), size, x, y))
    return objs


def _draw(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    r = SIZES[o.size] // 2
    box = (o.x - r, o.y - r, o.x + r, o.y + r)
    if o.shape == "circle":
        d.ellipse(box, fill=fill)
    elif o.shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=fill)


def render(objs: list[Obj], rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    for o in objs:
        _draw(d, o, tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLORS[o.color]))
    return img


def object_mask(objs: list[Obj], size: int = IMAGE_SIZE):
    """[size, size] uint8 array: 0 background, k the k-th object (same geometry as `render`)."""
    import numpy as np

    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    for k, o in enumerate(objs, 1):
        _draw(d, o, k)
    return np.asarray(m)


# Region labels: per cell of an n x n grid over the image (raster order, the order of the image tokens
# of both families), class ids (0 = no object) of the object's colour, shape, size and place among
# the objects (left / middle / right, as the questions name it: SLOT_WORDS).
REGION_ATTRIBUTES = ("color", "shape", "size", "place")
PLACES = ("on the left", "in the middle", "on the right")
REGION_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(PLACES) + 1)
IGNORE = -100


def region_labels(objs: list[Obj], n: int, min_pixels: int = 12) -> list[tuple[int, ...]]:
    """A cell shows an object if at least `min_pixels` of it fall into the cell (the biggest such
    object wins): its colour and place are labelled there. Shape and size are labelled only in the
    cell that holds the object's centre, where enough of it is visible to tell; IGNORE elsewhere."""
    import numpy as np

    m = object_mask(objs)
    side = m.shape[0]
    colors, sizes = list(COLORS), list(SIZES)
    places = SLOT_WORDS[len(objs)]
    out = []
    for i in range(n):
        for j in range(n):
            cell = m[i * side // n:(i + 1) * side // n, j * side // n:(j + 1) * side // n]
            counts = np.bincount(cell.ravel(), minlength=len(objs) + 1)[1:]
            if len(counts) == 0 or counts.max() < min_pixels:
                out.append((0, 0, 0, 0))
                continue
            k = int(counts.argmax())
            o = objs[k]
            color, place = colors.index(o.color) + 1, PLACES.index(places[k]) + 1
            if (o.y * n // side, o.x * n // side) == (i, j):
                out.append((color, SHAPES.index(o.shape) + 1, sizes.index(o.size) + 1, place))
            else:
                out.append((color, IGNORE, IGNORE, place))
    return out


# ---- questions -------------------------------------------------------------------------------
def _q_count(rng, objs):
    q = rng.choice(["How many shapes are there?", "How many objects are in the picture?",
                    "Count the shapes in the image.", "How many things can you see?"])
    return q, NUMBERS[len(objs)]


def _q_count_shape(rng, objs):
    shape = rng.choice(SHAPES)
    n = sum(o.shape == shape for o in objs)
    q = rng.choice([f"How many {shape}s are there?", f"Count the {shape}s.",
                    f"How many {shape}s are in the image?"])
    return q, NUMBERS[n]


def _unique_shape(rng, objs):
    counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    cands = [o for o in objs if counts[o.shape] == 1]
    return rng.choice(cands) if cands else None


def _q_color_of_shape(rng, objs):
    o = _unique_shape(rng, objs)
    if o is None:
        return None
    q = rng.choice([f"What color is the {o.shape}?", f"Which color does the {o.shape} have?",
                    f"Tell me the color of the {o.shape}."])
    return q, o.color


def _q_shape_of_color(rng, objs):
    o = rng.choice(objs)
    q = rng.choice([f"What shape is the {o.color} object?", f"Which shape is {o.color}?",
                    f"What is the shape of the {o.color} thing?"])
    return q, o.shape


def _q_describe_slot(rng, objs):
    if len(objs) == 1:
        o = objs[0]
        q = rng.choice(["What is in the image?", "Describe the shape.", "What do you see?"])
        return q, o.phrase()
    i = rng.choice([0, len(objs) - 1])
    side = "left" if i == 0 else "right"
    q = rng.choice([f"What is on the {side}?", f"Which object is furthest to the {side}?",
                    f"Describe the object on the {side}."])
    return q, objs[i].phrase()


def _q_where(rng, objs):
    if len(objs) == 1:
        return None
    i = rng.randrange(len(objs))
    o = objs[i]
    q = rng.choice([f"Where is the {o.color} {o.shape}?", f"Where is the {o.color} shape?",
                    f"In which part of the image is the {o.color} object?"])
    return q, SLOT_WORDS[len(objs)][i]


def _q_size(rng, objs):
    o = rng.choice(objs)
    q = rng.choice([f"Is the {o.color} {o.shape} big or small?", f"What size is the {o.color} object?",
                    f"How big is the {o.color} {o.shape}?"])
    return q, o.size


def _target(rng, objs):
    """An object picked by its place in the image (needs the image to resolve)."""
    if len(objs) == 1:
        return objs[0], rng.choice(["the object", "the shape", "the only shape"])
    i = rng.randrange(len(objs))
    ref = {0: "on the left", len(objs) - 1: "on the right"}.get(i, "in the middle")
    return objs[i], rng.choice([f"the object {ref}", f"the shape {ref}"])


def _listing(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


# The facts are listed one per line, each value right after its key ("red 6"), and the lookup answers
# name the key before the value ("red 8 points"). A key at the start of a line is the same token as
# at the start of the answer, so once the answer has named it (from the image), the value is an
# associative-recall copy: find the line that starts with this token, take the next one. Small
# models learn that within the training budget; with the value alone as the answer, or the facts
# in prose, they stayed at chance (docs/trained-models.md, "Answers that name the key").
POINTS_TITLES = ("Points:", "Points per color:", "What each color is worth:")
OWNER_TITLES = ("Owners:", "Who owns what:", "The owners:")


def _fact_lines(title: str, pairs: list[str]) -> str:
    return "\n".join([title, *pairs])


def _points_facts(rng, objs) -> tuple[str, dict[str, int]]:
    """Points per colour, one line each (every object's colour, maybe one colour that is absent)."""
    colors = [o.color for o in objs]
    extra = [c for c in COLORS if c not in colors]
    named = colors + rng.sample(extra, rng.randint(0, min(1, len(extra))))
    rng.shuffle(named)
    values = {c: rng.randint(1, 9) for c in named}
    return _fact_lines(rng.choice(POINTS_TITLES), [f"{c} {values[c]}" for c in named]), values


def _owner_facts(rng, objs) -> tuple[str, dict[str, str], str]:
    """Owners by shape (when the shapes differ) or by colour, one line each; and which key."""
    by = rng.choice(["shape", "color"])
    by = "shape" if by == "shape" and len({o.shape for o in objs}) == len(objs) else "color"
    keys = [getattr(o, by) for o in objs]
    owner = dict(zip(keys, (n.capitalize() for n in rng.sample(NAMES, len(keys)))))
    order = list(keys)
    rng.shuffle(order)
    return _fact_lines(rng.choice(OWNER_TITLES), [f"{k} {owner[k]}" for k in order]), owner, by


POINTS_QUESTIONS = ("How many points is {} worth?", "What is {} worth?", "How many points does {} give?")
OWNER_QUESTIONS = ("Who owns {}?", "Whose is {}?", "Who is the owner of {}?")


def _points_answer(o: Obj, values: dict[str, int]) -> str:
    return f"{o.color} {values[o.color]} points"


def _owner_answer(o: Obj, owner: dict[str, str], by: str) -> str:
    return f"{getattr(o, by)} {owner[getattr(o, by)]}"


def _q_points(rng, objs):
    """Facts in the text + the image: which colour is where."""
    fact, values = _points_facts(rng, objs)
    o, ref = _target(rng, objs)
    return f"{fact}\n{rng.choice(POINTS_QUESTIONS).format(ref)}", _points_answer(o, values)


def _q_owner(rng, objs):
    """Facts in the text + the image: owners by shape or colour, asked by place."""
    fact, owner, by = _owner_facts(rng, objs)
    o, ref = _target(rng, objs)
    return f"{fact}\n{rng.choice(OWNER_QUESTIONS).format(ref)}", _owner_answer(o, owner, by)


def _q_points_named(rng, objs):
    """Training only (AUX_KINDS): `points` with the object named in the question, so the text lookup
    can be learned before it is chained to a lookup in the image."""
    fact, values = _points_facts(rng, objs)
    o = rng.choice(objs)
    refs = (f"the {o.color} {o.shape}", f"the {o.color} object", f"the {o.color} shape")
    q = rng.choice([t.format(ref) for t, ref in zip(POINTS_QUESTIONS, refs)])
    return f"{fact}\n{q}", _points_answer(o, values)


def _q_owner_named(rng, objs):
    """Training only (AUX_KINDS): `owner` with the object named in the question."""
    fact, owner, by = _owner_facts(rng, objs)
    o = rng.choice(objs)
    ref = f"the {o.shape}" if by == "shape" else f"the {o.color} {rng.choice(['one', 'object', 'shape'])}"
    return f"{fact}\n{rng.choice(OWNER_QUESTIONS).format(ref)}", _owner_answer(o, owner, by)


def _q_scene(rng, objs):
    """Training only (see AUX_KINDS): every object, left to right. Many answer tokens depend on the
    image, so it gives the vision tower and the image-reading attention a dense signal."""
    q = rng.choice(["Describe the picture from left to right.", "List the shapes from left to right.",
                    "What is in the picture, from left to right?"])
    return q, _listing([o.phrase() for o in objs])


QUESTION_KINDS = {
    "count": _q_count, "count_shape": _q_count_shape, "color": _q_color_of_shape,
    "shape": _q_shape_of_color, "describe": _q_describe_slot, "where": _q_where, "size": _q_size,
    "points": _q_points, "owner": _q_owner,
}
# Context questions (text facts + image) are weighted up: they are the hardest and the ones where
# encoding the prompt well matters.
WEIGHTS = {"count": 1, "count_shape": 1, "color": 1, "shape": 1, "describe": 1.5, "where": 1, "size": 1,
           "points": 2, "owner": 2}
# Auxiliary kinds: used by the training curriculum (models/train.py), never in the held-out sets.
AUX_KINDS = {"scene": _q_scene, "points_named": _q_points_named, "owner_named": _q_owner_named}
IMAGE_ONLY_KINDS = ("count", "count_shape", "color", "shape", "describe", "where", "size")
CONTEXT_KINDS = ("points", "owner")


def sample(rng: random.Random, kinds: tuple[str, ...] | dict[str, float] | None = None) -> Sample:
    """One sample. kinds: names (weighted by WEIGHTS) or {name: weight}, from QUESTION_KINDS or
    AUX_KINDS (default: every question kind)."""
    if isinstance(kinds, dict):
        names, weights = list(kinds), list(kinds.values())
    else:
        names = list(kinds or QUESTION_KINDS)
        weights = [WEIGHTS[k] for k in names]
    while True:
        objs = _scene(rng)
        kind = rng.choices(names, weights)[0]
        qa = (QUESTION_KINDS.get(kind) or AUX_KINDS[kind])(rng, objs)
        if qa is not None:
            return Sample(render(objs, rng), qa[0], qa[1], kind, objs)


def make_dataset(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [sample(rng) for _ in range(n)]


def stream(seed: int):
    rng = random.Random(seed)
    while True:
        yield sample(rng)


def demo_sample() -> Sample:
    """The README demo: a fixed image and a question that needs both the image and the text."""
    rng = random.Random(DEMO_SEED)
    while True:
        s = sample(rng, ("points",))
        if len(s.objects) == 3:
            return s


def tokenizer_corpus(n: int = 20000, seed: int = 99) -> list[str]:
    """Text the task's tokenizer is trained on: questions and answers, plus every vocabulary word."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        objs = _scene(rng)
        kind = rng.choice(list(QUESTION_KINDS))
        qa = QUESTION_KINDS[kind](rng, objs)
        if qa is not None:
            lines += [qa[0], qa[1]]
    words = list(COLORS) + list(SHAPES) + list(SIZES) + NUMBERS + NAMES + [n.capitalize() for n in NAMES]
    lines += [" ".join(words)] * 50
    lines += ["user\nmodel\nassistant\nsystem\n"] * 50  # the chat template's role names
    lines += [str(i) for i in range(100)]
    return lines


def write_jsonl(path: str | Path, samples: list[Sample]) -> Path:
    """Chat rows for `popserve eval` / `popserve importance` (images inline as data URLs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for s in samples:
            fh.write(json.dumps({"messages": s.openai_messages(), "answer": s.answer, "kind": s.kind}) + "\n")
    return path


if __name__ == "__main__":  # a peek at the data
    for s in make_dataset(12, 0):
        print(f"[{s.kind}] {s.question} -> {s.answer}   ({', '.join(o.phrase() for o in s.objects)})")
    d = demo_sample()
    print("demo:", d.question, "->", d.answer)
