"""The text lookups of the trained models, alone (docs/trained-models.md, "the text lookup on its own"
and after).

Trains the language model of the shipped shape (Qwen3-VL, or --family gemma3; no vision stage) on
the two named lookups alone ("Points:\nred 6\nblue 3\nHow many points is the red one worth?" ->
"red 6 points"), optionally after and/or alongside dense associative-recall streams (the same keys
repeated in one stream, loss on every repeated key's value), and prints the recall accuracy and the
lookups' teacher-forced exact match as it goes. One core, one thread; a diagnostic, not the
shipped recipe.

    python bench/lookup_plateau.py --minutes 6              # the recipe's planted head: ~0.95 by step 300
    python bench/lookup_plateau.py --offsets 0 --minutes 6  # no planted head: ~0.50 (chance) at step 600
    python bench/lookup_plateau.py --offsets 0 --pretrain-s 1200 --minutes 0  # bare recall: forms ~step 1900
    python bench/lookup_plateau.py --pretrain-s 300 --minutes 0               # with the head: ~step 200
    python bench/lookup_plateau.py --turns 3 --minutes 7    # several questions per chat

The arms in the docs before "Answers that name the key" ran on the earlier format (facts in prose,
the value alone as the answer; this script at commit 411f4aa, which also had --adjacent).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.train as T  # noqa: E402
from models import synthvqa  # noqa: E402

LOOKUPS = {"points_named": 1.0, "owner_named": 1.0}
PHRASES = ("the {} one {},", "the {} one is worth {},", "the {} object is worth {} points,")


class RecallStreams:
    """16 streams per batch over `n_keys` keys each; `bare`: key value key value ... (48 tokens);
    `facts`: the facts' own phrases (90 tokens), the value 1-3 tokens after its colour."""

    def __init__(self, tok, fmt: str, seed: int, n_keys: int = 4):
        self.tok, self.fmt, self.rng, self.n_keys = tok, fmt, random.Random(seed + 7), n_keys
        self.keys = [self.ids(" " + w)[0] for w in list(synthvqa.COLORS) + ["circle", "square", "triangle"]]
        self.values = [self.ids(f" {d}")[0] for d in range(1, 10)]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, labels = [], []
        for _ in range(16):
            seq, lab, seen = [], [], set()
            if self.fmt == "bare":
                keys = self.rng.sample(self.keys, self.n_keys)
                bind = {k: self.rng.choice(self.values) for k in keys}
                for _ in range(24):
                    k = self.rng.choice(keys)
                    seq += [k, bind[k]]
                    lab += [-100, bind[k] if k in seen else -100]
                    seen.add(k)
            else:
                colours = self.rng.sample(list(synthvqa.COLORS), self.n_keys)
                bind = {c: self.rng.randint(1, 9) for c in colours}
                while len(seq) < 90:
                    c = self.rng.choice(colours)
                    t = self.ids(" " + self.rng.choice(PHRASES).format(c, bind[c]))
                    at = t.index(self.values[bind[c] - 1])
                    seq += t
                    lab += [t[j] if j == at and c in seen else -100 for j in range(len(t))]
                    seen.add(c)
                seq, lab = seq[:90], lab[:90]
            seqs.append(seq)
            labels.append(lab)
        return torch.tensor(seqs), torch.tensor(labels)

    def loss(self, model) -> tuple[torch.Tensor, float]:
        ids, labels = self.batch()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        acc = ((logits.argmax(-1) == target) & mask).sum().item() / mask.sum().item()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100), acc


class SeveralTurns:
    """Up to `turns` questions about the same facts in one chat (user: facts + question, assistant:
    answer, user: question, ...), the loss on every answer; exact match is read on the last answer,
    which is as far from the facts as in the single-question arms or farther."""

    def __init__(self, turns: int):
        self.turns, self.extra = turns, {}
        for kind, make in (("points_named", self.points), ("owner_named", self.owners)):
            synthvqa.AUX_KINDS[kind] = make

    def points(self, rng, objs):
        fact, values = synthvqa._points_facts(rng, objs)
        asked = rng.sample(objs, min(self.turns, len(objs)))
        qa = [(rng.choice(synthvqa.POINTS_QUESTIONS).format(f"the {o.color} {rng.choice(['object', 'shape', o.shape])}"),
               synthvqa._points_answer(o, values)) for o in asked]
        return self.chat(fact, qa)

    def owners(self, rng, objs):
        fact, owner, by = synthvqa._owner_facts(rng, objs)
        qa = [(rng.choice(synthvqa.OWNER_QUESTIONS).format(
               f"the {o.shape}" if by == "shape" else f"the {o.color} {rng.choice(['one', 'object', 'shape'])}"),
               synthvqa._owner_answer(o, owner, by)) for o in rng.sample(objs, min(self.turns, len(objs)))]
        return self.chat(fact, qa)

    def chat(self, fact, qa):
        if len(qa) < 2:  # one object: no chat; synthvqa.sample draws another scene
            return None
        question = f"{fact}\n{qa[0][0]}"
        self.extra[question] = qa
        return question, qa[-1][1]

    def encode(self, processor, family, s):
        """What train.encode_sample gives, for the whole chat: the prompt runs up to the last
        question, `spans` are where the earlier answers sit in it."""
        eot = processor.tokenizer.convert_tokens_to_ids(T.END_OF_TURN[family])
        messages, spans = s.messages(), []
        for k, (q, a) in enumerate(self.extra.pop(s.question)):
            if k:
                messages.append({"role": "user", "content": q})
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            b = processor(text=[text], images=[s.image], return_tensors="pt")
            answer = processor.tokenizer(a, add_special_tokens=False)["input_ids"] + [eot]
            spans.append((b["input_ids"].shape[1], answer))
            messages.append({"role": "assistant", "content": a})
        prompt = b["input_ids"][0]
        for at, answer in spans[:-1]:
            assert prompt[at: at + len(answer)].tolist() == answer, "an answer tokenises differently in the chat"
        return {"prompt": prompt, "answer": torch.tensor(spans[-1][1]), "pixel_values": b["pixel_values"],
                "types": b["mm_token_type_ids"][0], "grid": b["image_grid_thw"], "spans": spans[:-1]}

    def collate(self, collate, items, family, pad_id):
        """The earlier answers become the batch's prompt_labels: train's loss adds them at
        prompt_weight (set to 1), and its exact match stays on the last answer."""
        batch = collate(items, family, pad_id)
        batch["prompt_labels"].fill_(-100)
        for i, it in enumerate(items):
            for at, answer in it["spans"]:
                batch["prompt_labels"][i, at: at + len(answer)] = torch.tensor(answer)
        return batch


def recent(accs: list[float], n: int = 50) -> float:
    return sum(accs[-n:]) / len(accs[-n:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=7.0, help="CPU minutes of lookups (0: recall only)")
    ap.add_argument("--pretrain-s", type=float, default=0.0, help="CPU seconds of recall alone first")
    ap.add_argument("--format", choices=("bare", "facts"), default="bare")
    ap.add_argument("--keys", type=int, default=4, help="keys per recall stream")
    ap.add_argument("--mix", type=float, default=0.0, help="weight of a recall batch in every lookup step")
    ap.add_argument("--lr", type=float, default=5e-4, help="the lookups' learning rate (recall alone: 1e-3)")
    ap.add_argument("--const-lr", action="store_true", help="no cosine decay after warm-up")
    ap.add_argument("--offsets", default="1", help="plant layer-0 heads that look this many tokens back "
                    "(comma-separated, one per query head; 1 = a previous-token head, the recipe's; 0 = none)")
    ap.add_argument("--turns", type=int, default=1, help="up to this many questions about the same facts per chat")
    ap.add_argument("--family", choices=("qwen3-vl", "gemma3"), default="qwen3-vl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/popserve-lookup-plateau")
    args = ap.parse_args()
    torch.set_num_threads(1)
    T.PLANTED_OFFSETS = tuple(int(o) for o in args.offsets.split(",") if o.strip() not in ("", "0"))
    prompt_weight = T.PROMPT_LOSS_WEIGHT
    if args.turns > 1:
        turns, collate = SeveralTurns(args.turns), T.collate
        T.encode_sample = turns.encode
        T.collate = lambda items, family, pad_id: turns.collate(collate, items, family, pad_id)
        prompt_weight = 1.0
    warmup_cosine = T.warmup_cosine
    if args.const_lr:  # the shipped warm-up, then no decay
        T.warmup_cosine = lambda lr, step, warmup, frac: warmup_cosine(lr, step, warmup, 0.0)
    recall: dict = {}
    build = T.build_model

    def build_then_pretrain(family, layers, seed):
        model, processor = build(family, layers, seed)
        streams = recall["streams"] = RecallStreams(processor.tokenizer, args.format, seed, args.keys)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
        c0, step, accs = time.process_time(), 0, []
        while time.process_time() - c0 < args.pretrain_s:
            loss, acc = streams.loss(model)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(1e-3, step, 50, 0.0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            accs.append(acc)
            step += 1
            if step % 100 == 0:
                print(f"recall step {step}: accuracy {recent(accs):.2f} (last 50 steps)", flush=True)
        return model, processor

    lookup_loss = T.loss_and_acc

    def lookup_and_recall_loss(model, batch, prompt_weight=0.0):
        loss, ok = lookup_loss(model, batch, prompt_weight)
        if args.mix:
            extra, acc = recall["streams"].loss(model)
            loss = loss + args.mix * extra
            recall.setdefault("accs", []).append(acc)
            if len(recall["accs"]) % 100 == 0:
                print(f"\nlookup step {len(recall['accs'])}: recall accuracy {recent(recall['accs']):.2f}", flush=True)
        return loss, ok

    # train() has no hooks for a pretraining stage or an extra loss, and the shipped recipe needs none:
    # this diagnostic swaps its own builder and loss into the module instead.
    T.build_model, T.loss_and_acc = build_then_pretrain, lookup_and_recall_loss
    if args.minutes <= 0:
        build_then_pretrain(args.family, T.TEXT["num_hidden_layers"], args.seed)
        return
    info = T.train(args.family, args.out, steps=100_000, lr=args.lr, seed=args.seed, max_minutes=args.minutes,
                   vision_steps=0, region_weight=0.0, curriculum=((1.0, LOOKUPS),), probe_every=0,
                   hard_kinds=False, prompt_weight=prompt_weight)
    print("lookups, teacher-forced exact match (moving average) by step:",
          ", ".join(f"{r['step']}: {r['tf_acc']:.2f}" for r in info["history"][::4]))


if __name__ == "__main__":
    main()
