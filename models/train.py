"""Train small Qwen3-VL / Gemma-3 models from scratch on SynthVQA (CPU, one thread).

    popserve train --family qwen3-vl --out models/checkpoints/qwen3-vl-shapes --steps 700

The checkpoint is a normal transformers directory (config, fp32 safetensors, generation config,
tokenizer with the family's special tokens and chat template, the family's real processor), so
`<Family>ForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` and every
popserve stage load it. Training is teacher forcing on the chat-templated prompt + answer +
end-of-turn token (the model's eos), with the loss on the answer tokens (and eos) only.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import synthvqa
from . import tiny
from .families import family_for
from .families.base import get_module

PROBE_SEED = 4321  # the probes logged during training (not a training or test seed)
END_OF_TURN = {"qwen3-vl": "<|im_end|>", "gemma3": "<end_of_turn>"}

# Model shapes: a few million parameters, 12 decoder layers (POP at 1/3 skips 4).
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=12, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


# Curriculum: (until this fraction of the steps, {kind: weight}). The first part has only questions
# answered from the image, plus full left-to-right scene descriptions ("scene", an auxiliary kind that
# is never asked in the held-out sets), whose answers depend on the image in almost every token.
# Scene descriptions stay in the mix after that.
# The text lookups with the object named in the question ("points_named", "owner_named", also
# auxiliary) run from the start: the lookup is learned on them before it is chained to the image.
CURRICULUM = (
    (0.15, {"scene": 3.0, "points_named": 1.5, "owner_named": 1.5,
            **{k: synthvqa.WEIGHTS[k] for k in synthvqa.IMAGE_ONLY_KINDS}}),
    (1.0, {"scene": 1.5, "points_named": 1.0, "owner_named": 1.0, **synthvqa.WEIGHTS}),
)
# Weight of a language-model loss on the prompt's text tokens (questions and facts), next to the
# answer loss: the forward pass is paid for anyway, and predicting the facts' colours and order
# trains reading the image and the earlier facts.
PROMPT_LOSS_WEIGHT = 0.2


BUCKET = 4  # batches drawn at once and grouped by length


def curriculum_kinds(frac: float, curriculum=CURRICULUM) -> dict[str, float]:
    for until, kinds in curriculum:
        if frac < until:
            return kinds
    return curriculum[-1][1]


class KindErrors:
    """Hard-kind sampling: the curriculum's weight of each question kind is scaled by the kind's
    recent error rate (a moving average of teacher-forced exact match on its training samples), so
    the steps go where the model still fails (the lookups) instead of where it is already right
    (counting); `floor` keeps mastered kinds in the mix. Kinds not seen yet count as all wrong."""

    def __init__(self, floor: float = 0.1, decay: float = 0.98):
        self.floor, self.decay, self.error = floor, decay, {}

    def update(self, kinds: list[str], ok: list[bool]) -> None:
        for kind, right in zip(kinds, ok):
            e = self.error.get(kind, 1.0)
            self.error[kind] = self.decay * e + (1 - self.decay) * (0.0 if right else 1.0)

    def reweight(self, weights: dict[str, float]) -> dict[str, float]:
        return {k: w * max(self.error.get(k, 1.0), self.floor) for k, w in weights.items()}


# ---- tokenizer -------------------------------------------------------------------------------
def train_tokenizer(family: str, vocab_size: int = 768):
    """The tiny checkpoints' tokenizer recipe, trained on the task's text (task words become
    single tokens)."""
    return tiny.train_tokenizer(family, vocab_size, corpus=synthvqa.tokenizer_corpus())


# ---- configs ---------------------------------------------------------------------------------
def qwen_config(tok, layers: int):
    vision = dict(depth=2, hidden_size=96, intermediate_size=256, num_heads=4, deepstack_visual_indexes=[0, 1],
                  num_position_embeddings=144, initializer_range=0.02)
    return tiny.qwen3_vl_config(tok, dict(TEXT, num_hidden_layers=layers), vision, max_positions=4096,
                                rope_theta=10_000.0, init=0.02, stop_ids=True)


def gemma_config(tok, layers: int):
    # 96x96 images taken whole: 6x6 patches of 16, average-pooled 2x2 into 3x3 = 9 image tokens, one
    # column of tokens per third of the image (as Qwen3-VL's 2x2 merge gives).
    vision = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=synthvqa.IMAGE_SIZE, patch_size=16)
    return tiny.gemma3_config(tok, dict(TEXT, num_hidden_layers=layers), vision, max_positions=4096, window=64,
                              init=0.02, mm_tokens=9, text_stops_at_end_of_turn=True)


def make_processor(family: str, tok, config):
    # 96x96 images stay 96x96: 6x6 patches of 16, merged (Qwen3-VL) or pooled (Gemma-3) to 9 tokens.
    return tiny.processor(family, tok, config, 96 * 96)


def build_model(family: str, layers: int, seed: int):
    from transformers import Gemma3ForConditionalGeneration, Qwen3VLForConditionalGeneration

    tok = train_tokenizer(family)
    config = qwen_config(tok, layers) if family == "qwen3-vl" else gemma_config(tok, layers)
    torch.manual_seed(seed)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Gemma3ForConditionalGeneration
    model = cls(config)
    if family == "gemma3":  # HF initialises the projector to zeros, which blocks the image's gradient
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
    plant_positional_heads(model, PLANTED_OFFSETS)
    return model, make_processor(family, tok, config)


# Layer 0's first query head starts as a previous-token head. The lookups (`points`, `owner`) are an
# associative recall: the answer names a key and copies the token after that key in the facts. That
# circuit needs a head that moves each token's predecessor into it; learned from scratch, the models
# sat at chance on the lookups for this whole budget, and with the head planted they learn them in
# a few hundred steps (docs/trained-models.md, "Answers that name the key"). Training may change it.
PLANTED_OFFSETS = (1,)


def plant_positional_heads(model, offsets, pairs: int = 4, sharpness: float = 3.0) -> None:
    """Layer 0's query head h attends to the token offsets[h] positions back: its queries and keys
    read one embedding dimension that is constant over the vocabulary, and the query is rotated back
    by that distance's RoPE angle on the `pairs` fastest frequencies, so q.k peaks at that distance
    (attention weight >0.99 there at initialisation; tests/test_training.py). Works for both
    families' attention (RoPE after q/k norms; Gemma's norms scale by 1 + weight). The q/k norm
    weights are shared by the layer's heads, so the others see those dimensions scaled too."""
    if not offsets:
        return
    lm = model.model.language_model
    attn = lm.layers[0].self_attn
    d, const = attn.head_dim, lm.config.hidden_size - 1
    rotary = lm.rotary_emb
    inv_freq = getattr(rotary, f"{getattr(attn, 'layer_type', None)}_inv_freq", None)
    theta = (rotary.inv_freq if inv_freq is None else inv_freq)[:pairs]
    group = lm.config.num_attention_heads // lm.config.num_key_value_heads
    half = d // 2
    used = list(range(pairs)) + list(range(half, half + pairs))
    norm_offset = 1.0 if type(attn.q_norm).__name__.startswith("Gemma") else 0.0
    with torch.no_grad():
        lm.embed_tokens.weight[:, const] = 0.2
        for h, offset in enumerate(offsets):
            q, k = torch.zeros(d), torch.zeros(d)
            q[:pairs], q[half:half + pairs] = torch.cos(offset * theta), -torch.sin(offset * theta)
            k[:pairs] = 1.0
            rows = slice(h * d, (h + 1) * d)
            attn.q_proj.weight[rows] = 0
            attn.q_proj.weight[rows, const] = q
            kv = slice(h // group * d, (h // group + 1) * d)
            attn.k_proj.weight[kv] = 0
            attn.k_proj.weight[kv, const] = k
        attn.q_norm.weight[used] = sharpness - norm_offset
        attn.k_norm.weight[used] = sharpness - norm_offset


# ---- batches ---------------------------------------------------------------------------------
def encode_sample(processor, family: str, s: synthvqa.Sample) -> dict:
    """One sample -> prompt ids (exactly what PromptBuilder builds) + answer ids + eos."""
    text = processor.apply_chat_template(s.messages(), add_generation_prompt=True, tokenize=False)
    b = processor(text=[text], images=[s.image], return_tensors="pt")
    ans = processor.tokenizer(s.answer, add_special_tokens=False)["input_ids"]
    ans = ans + [processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])]
    out = {"prompt": b["input_ids"][0], "answer": torch.tensor(ans), "pixel_values": b["pixel_values"]}
    types = b.get("mm_token_type_ids", b.get("token_type_ids"))
    out["types"] = types[0]
    if "image_grid_thw" in b:
        out["grid"] = b["image_grid_thw"]
    return out


def collate(items: list[dict], family: str, pad_id: int) -> dict:
    n = max(len(it["prompt"]) + len(it["answer"]) for it in items)
    B = len(items)
    ids = torch.full((B, n), pad_id, dtype=torch.long)
    labels = torch.full((B, n), -100, dtype=torch.long)
    prompt_labels = torch.full((B, n), -100, dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.long)
    types = torch.zeros((B, n), dtype=torch.long)
    for i, it in enumerate(items):
        p, a = it["prompt"], it["answer"]
        ids[i, : len(p)] = p
        ids[i, len(p): len(p) + len(a)] = a
        labels[i, len(p): len(p) + len(a)] = a  # the loss: answer tokens and eos only
        prompt_labels[i, : len(p)] = torch.where(it["types"] == 0, p, -100)  # the prompt's text tokens
        mask[i, : len(p) + len(a)] = 1
        types[i, : len(p)] = it["types"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_labels": prompt_labels,
             "pixel_values": torch.cat([it["pixel_values"] for it in items])}
    if family == "qwen3-vl":
        batch["image_grid_thw"] = torch.cat([it["grid"] for it in items])
        batch["mm_token_type_ids"] = types
    else:
        batch["token_type_ids"] = types
    return batch


def loss_and_acc(model, batch, prompt_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over each answer's tokens (and eos), averaged per sample and then over the
    batch, so that long answers (scene descriptions) weigh as much as short ones (+ `prompt_weight`
    x the mean cross-entropy over the prompt's text tokens); and per sample, whether the answer is
    teacher-forced exactly right (bool [batch])."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "prompt_labels")}
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    n_tokens = (target != -100).sum(-1).clamp(min=1)
    loss = (per_token.sum(-1) / n_tokens).mean()
    if prompt_weight:
        loss = loss + prompt_weight * torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["prompt_labels"][:, 1:], ignore_index=-100)
    with torch.no_grad():  # teacher-forced exact match: every answer token (and eos) argmax-right
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(-1)
    return loss, ok


# ---- image regions: a direct training signal for the vision tower -----------------------------
# Why the first checkpoints ignored the image (docs/trained-models.md): a vision tower trained from
# scratch only through the language model's answer loss gets a weak, noisy gradient, the language
# model meanwhile settles on the text priors, and the tower never learns to tell shapes apart. With
# the tower's output replaced by clean per-region attributes, the same language model learns to read
# the image within a few hundred steps. So the tower is first trained on its own (stage 0) to
# predict, for every image token, the colour / shape / size / place (left, middle, right) of the
# object in that region of the image (labels from the generator's scene), through a linear read-out
# that is dropped afterwards; the same loss stays on at a small weight during the VQA stage.
VISION_PRETRAIN = dict(steps=1000, batch_size=32, lr=2e-3, warmup=30)
REGION_LOSS_WEIGHT = 0.2


class RegionHead(torch.nn.Module):
    """Linear read-out of colour / shape / size / place from each image token's features (as they
    enter the language model). Training only: not part of the checkpoint."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, sum(synthvqa.REGION_CLASSES))

    def forward(self, feats: torch.Tensor, samples: list[synthvqa.Sample]) -> tuple[torch.Tensor, list[float]]:
        """feats: [images * tokens, hidden] in image-token order (raster order within an image)."""
        grid = math.isqrt(feats.shape[0] // len(samples))  # image tokens per side (3 for both shipped shapes)
        labels = torch.tensor([lab for s in samples for lab in synthvqa.region_labels(s.objects, grid)])
        logits = self.proj(feats.float()).split(list(synthvqa.REGION_CLASSES), dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(z, labels[:, i], ignore_index=synthvqa.IGNORE)
                   for i, z in enumerate(logits))
        with torch.no_grad():  # accuracy on the cells that show an object
            accs = []
            for i, z in enumerate(logits):
                keep = labels[:, i] > 0
                accs.append((z[keep].argmax(-1) == labels[keep, i]).float().mean().item() if keep.any() else float("nan"))
        return loss, accs


def vision_modules(model) -> list[torch.nn.Module]:
    """The vision tower + projector of a <Family>ForConditionalGeneration (the family's vision_paths),
    the last of them the one whose output enters the language model."""
    return [get_module(model, path) for path in family_for(model.config).vision_paths]


def image_features(model, pixels: dict) -> torch.Tensor:
    """Image features as they enter the language model, through the serving code's family adapter
    (with gradients): [images * tokens, hidden]."""
    fam = family_for(model.config)
    return torch.cat([f.data[0] for f in fam.encode_pixels(model.model, fam.split_pixels(pixels))])


def warmup_cosine(lr: float, step: int, warmup: int, frac: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% of `lr` at frac = 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pretrain_vision(model, processor, family: str, head: RegionHead, rng: random.Random, steps: int,
                    batch_size: int, lr: float, warmup: int, log_every: int = 50) -> list[dict]:
    """Stage 0: the vision tower + projector (and the read-out) on region labels alone
    (`batch_size` per process)."""
    from tqdm import tqdm

    params = [p for m in vision_modules(model) for p in m.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    probe = synthvqa.make_dataset(64, PROBE_SEED)
    probe_pixels = processor.image_processor(images=[s.image for s in probe], return_tensors="pt")
    history = []
    bar = tqdm(range(steps), desc=f"vision {family}", unit="step", dynamic_ncols=True, disable=world()[0] != 0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(lr, step, warmup, step / steps)
        scenes = [synthvqa.sample(rng) for _ in range(batch_size)]
        pixels = processor.image_processor(images=[s.image for s in scenes], return_tensors="pt")
        loss, _ = head(image_features(model, pixels), scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                ploss, accs = head(image_features(model, probe_pixels), probe)
            row = dict(step=step + 1, loss=round(loss.item(), 4), probe_loss=round(ploss.item(), 4))
            row.update({f"probe_{a}_acc": round(x, 3) for a, x in zip(synthvqa.REGION_ATTRIBUTES, accs)})
            history.append(row)
            bar.set_postfix(loss=f"{ploss.item():.3f}", **{a: f"{x:.2f}" for a, x in zip(synthvqa.REGION_ATTRIBUTES, accs)})
    bar.close()
    return history


def image_reliance(model, processor, family: str, samples: list[synthvqa.Sample]) -> tuple[float, float]:
    """Teacher-forced loss on `samples` with their own images, and with every image swapped for the
    previous sample's. Equal losses mean the model ignores the image."""
    pad_id = processor.tokenizer.pad_token_id
    items = [encode_sample(processor, family, s) for s in samples]
    swapped = [dict(it, pixel_values=items[i - 1]["pixel_values"], **({"grid": items[i - 1]["grid"]} if "grid" in it else {}))
               for i, it in enumerate(items)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        own = loss_and_acc(model, collate(items, family, pad_id))[0].item()
        other = loss_and_acc(model, collate(swapped, family, pad_id))[0].item()
    model.train(was_training)
    return own, other


# ---- data parallel: one training process per core ----------------------------------------------
# On a CPU more compute means more cores, and one single-threaded process per core scales better than
# more threads in one process (2 threads: 1.41x). So `procs` processes train one model, each pinned
# to its own core with its own data stream, and average their gradients every step over
# torch.distributed (gloo). The all-reduce is written out (one flat tensor per step) rather than
# wrapping the model in DistributedDataParallel, because the vision pretraining and the region loss
# run parts of the model outside its forward, where DDP's hooks would not see them.
def world() -> tuple[int, int]:
    """(rank, number of processes) of this training process; (0, 1) when not data parallel."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def average_gradients(params) -> None:
    size = world()[1]
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= size
    for g, mean in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(mean)


def agreed_max(x: float) -> float:
    """The largest x over the processes: every process takes the same lr and the same stop decision."""
    if world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def share_weights(model, processor) -> None:
    """Every process starts from rank 0's weights, and must have built the same tokenizer."""
    if world()[1] == 1:
        return
    for t in model.state_dict().values():
        dist.broadcast(t, 0)
    vocab = sorted(processor.tokenizer.get_vocab().items())
    vocabs = [None] * world()[1]
    dist.all_gather_object(vocabs, vocab)
    if any(v != vocab for v in vocabs):
        raise RuntimeError("the training processes built different tokenizers")


def check_in_sync(model) -> None:
    """The processes must end with the same weights (each step applies the same averaged gradients)."""
    if world()[1] == 1:
        return
    digest = [float(p.double().sum()) for p in model.parameters()]
    digests = [None] * world()[1]
    dist.all_gather_object(digests, digest)
    if any(d != digest for d in digests):
        raise RuntimeError("data-parallel training processes drifted apart")


def _parallel_worker(rank: int, procs: int, port: int, cores: list[int] | None, kwargs: dict) -> None:
    if cores:
        os.sched_setaffinity(0, {cores[rank]})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=procs)
    try:
        train(**kwargs)
    finally:
        dist.destroy_process_group()


def train_parallel(procs: int, **kwargs) -> dict:
    """`train` in `procs` processes (one per core when there are enough cores); rank 0 writes the
    checkpoint and training.json, which this returns."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cores = sorted(os.sched_getaffinity(0))
    torch.multiprocessing.spawn(_parallel_worker, args=(procs, port, cores if len(cores) >= procs else None,
                                                        dict(kwargs, procs=procs)), nprocs=procs)
    return json.loads((Path(kwargs["out"]) / "training.json").read_text())


def rank_rng(seed: int) -> random.Random:
    """This process's random stream of `seed` (rank 0: the single-process stream)."""
    rank = world()[0]
    return random.Random(seed if rank == 0 else f"{seed}/rank{rank}")


# ---- training --------------------------------------------------------------------------------
def train(family: str, out: str | Path, steps: int, batch_size: int = 16, lr: float = 5e-4,
          layers: int = 12, seed: int = 0, threads: int = 1, warmup: int = 100,
          max_minutes: float = 28.0, log_every: int = 25, init_from: str | Path | None = None,
          data_seed: int | None = None, vision_lr_mult: float = 1.0, curriculum=CURRICULUM,
          probe_every: int = 250, vision_steps: int | None = None,
          region_weight: float = REGION_LOSS_WEIGHT, prompt_weight: float = PROMPT_LOSS_WEIGHT,
          hard_kinds: bool = True, procs: int = 1) -> dict:
    """Stage 0 (`vision_steps`, default VISION_PRETRAIN, none when continuing a checkpoint): the
    vision tower on region labels. Stage 1 (`steps`): everything, teacher forcing on SynthVQA with
    the curriculum, plus `region_weight` x the region loss. `max_minutes` of CPU time (per process)
    covers both. `procs` > 1: data parallel, one process per core, `batch_size` per process."""
    from tqdm import tqdm

    if procs > 1 and world()[1] == 1:  # start the processes, each runs this function with these arguments
        return train_parallel(**{k: v for k, v in locals().items() if k != "tqdm"})
    rank, size = world()
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    prior = None
    if init_from:  # a second stage: continue training a checkpoint written by this function
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(init_from)
        prior_path = Path(init_from) / "training.json"
        prior = json.loads(prior_path.read_text()) if prior_path.exists() else None
    else:
        model, processor = build_model(family, layers, seed)
    share_weights(model, processor)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    pad_id = processor.tokenizer.pad_token_id
    c0 = time.process_time()
    t0 = time.time()
    hidden = model.config.get_text_config().hidden_size
    head = RegionHead(hidden)
    if vision_steps is None:
        vision_steps = 0 if init_from else VISION_PRETRAIN["steps"]
    if init_from and curriculum is CURRICULUM:  # a second stage: the model reads images already
        curriculum = CURRICULUM[-1:]
    vision_history = []
    if vision_steps:
        vcfg = dict(VISION_PRETRAIN, steps=vision_steps)
        vision_history = pretrain_vision(model, processor, family, head, rank_rng(seed + 1), vcfg["steps"],
                                         max(1, vcfg["batch_size"] // size), vcfg["lr"], vcfg["warmup"])
    vision_cpu = time.process_time() - c0
    vision_wall = time.time() - t0
    # The region loss during stage 1 reads the features where they enter the language model.
    tap: dict = {}
    hook = vision_modules(model)[-1].register_forward_hook(
        lambda m, i, o: tap.__setitem__("feats", getattr(o, "pooler_output", o)))
    groups: dict[tuple, list] = {(1.0, 0.0): list(head.parameters())} if region_weight else {}
    vision_ids = {id(p) for m in vision_modules(model) for p in m.parameters()}
    for n, p in model.named_parameters():
        vision = id(p) in vision_ids
        decays = p.ndim >= 2 and "embed" not in n
        groups.setdefault((vision_lr_mult if vision else 1.0, 0.01 if decays else 0.0), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr_mult": mult} for (mult, wd), ps in groups.items()],
                            lr=lr, betas=(0.9, 0.98))

    def progress(step):
        # Step-driven (reproducible). The budget is CPU time of this process (one thread: minutes of
        # one core), so other jobs on a shared machine stretch the wall clock but not the result;
        # on a slower machine the budget drives the cosine schedule so the run still anneals.
        # Data parallel: the furthest process decides, so all take the same lr and stop together.
        return agreed_max(max(step / steps, (time.process_time() - c0) / 60 / max_minutes))

    # The training stream; held-out sets use other seeds (synthvqa.HELDOUT_SEED, EVAL_SEED).
    data_rng = rank_rng(seed if data_seed is None else data_seed)
    # The image-reliance probe: held-out questions (not the tests' HELDOUT_SEED), own vs swapped images.
    probe = synthvqa.make_dataset(48, PROBE_SEED)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    history = []
    queue: list = []
    kind_errors = KindErrors()
    ema_loss, ema_acc = None, None
    time_limited = False
    bar = tqdm(range(steps), desc=f"train {family}", unit="step", dynamic_ncols=True, disable=rank != 0)
    done = 0
    start = progress(0)  # the vision pretraining's share of the budget
    for step in bar:
        frac = progress(step)
        if frac >= 1.0 and step:
            time_limited = step < steps
            if rank == 0:
                print(f"stopping at step {step}: CPU budget of {max_minutes} min reached")
            break
        if not queue:  # BUCKET batches at a time, grouped by length: less padding, same samples
            # The curriculum's phases are fractions of this stage (the budget left after the vision stage).
            kinds = curriculum_kinds((frac - start) / max(1 - start, 1e-6), curriculum) if curriculum else None
            if kinds and hard_kinds:
                kinds = kind_errors.reweight(kinds)
            drawn = [synthvqa.sample(data_rng, kinds) for _ in range(BUCKET * batch_size)]
            encoded = [encode_sample(processor, family, s) for s in drawn]
            order = sorted(range(len(drawn)), key=lambda i: len(encoded[i]["prompt"]) + len(encoded[i]["answer"]))
            chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
            data_rng.shuffle(chunks)
            queue = [([drawn[i] for i in c], [encoded[i] for i in c]) for c in chunks]
        samples, encoded_batch = queue.pop()
        batch = collate(encoded_batch, family, pad_id)
        lr_now = warmup_cosine(lr, step, warmup, frac)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_mult"]
        loss, ok = loss_and_acc(model, batch, prompt_weight)
        acc = ok.float().mean().item()
        kind_errors.update([s.kind for s in samples], ok.tolist())
        total = loss
        if region_weight:
            region_loss, _ = head(tap["feats"].reshape(-1, hidden), samples)
            total = loss + region_weight * region_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.set_postfix(loss=f"{ema_loss:.3f}", tf_acc=f"{ema_acc:.2f}", lr=f"{lr_now:.1e}")
        if rank == 0 and (done % log_every == 0 or done == steps):
            row = dict(step=done, loss=round(ema_loss, 4), tf_acc=round(ema_acc, 3),
                       elapsed_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
            if probe_every and (done % probe_every == 0 or done == steps):
                own, swapped = image_reliance(model, processor, family, probe)
                row.update(probe_loss=round(own, 4), probe_loss_swapped_images=round(swapped, 4))
                bar.write(f"step {done}: held-out loss {own:.3f}, with swapped images {swapped:.3f}")
            history.append(row)
    bar.close()
    hook.remove()
    elapsed = time.time() - t0
    check_in_sync(model)
    if rank != 0:  # rank 0 writes the checkpoint
        return {}
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = sorted({processor.tokenizer.eos_token_id,
                                                   processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])})
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out)  # fp32 safetensors
    processor.save_pretrained(out)
    info = dict(family=family, params=n_params, layers=layers, steps=done, planned_steps=steps, time_limited=time_limited,
                cpu_seconds=round(time.process_time() - c0, 1),
                batch_size=batch_size, lr=lr, vision_lr_mult=vision_lr_mult, seed=seed, threads=threads, wall_seconds=round(elapsed, 1),
                processes=size, samples_seen=done * batch_size * size, warmup=warmup,
                hard_kinds=dict(floor=kind_errors.floor, final_error={k: round(e, 3) for k, e in sorted(kind_errors.error.items())})
                if hard_kinds else None,
                curriculum=[dict(until=u, kinds=k) for u, k in curriculum] if curriculum else None,
                vocab_size=len(processor.tokenizer), region_loss_weight=region_weight, prompt_loss_weight=prompt_weight,
                vision_pretrain=dict(VISION_PRETRAIN, steps=vision_steps, cpu_seconds=round(vision_cpu, 1),
                                     wall_seconds=round(vision_wall, 1), history=vision_history),
                history=history)
    info["data_seed"] = seed if data_seed is None else data_seed
    if prior is not None:
        info["init_from"] = str(init_from)
        info["previous_stages"] = prior.get("previous_stages", []) + [{k: v for k, v in prior.items()
                                                                     if k != "previous_stages"}]
    (out / "training.json").write_text(json.dumps(info, indent=2))
    print(f"saved {family} ({n_params / 1e6:.2f}M params, {vision_steps} vision + {done} steps, "
          f"{info['cpu_seconds'] / 60:.1f} CPU-min, {elapsed / 60:.1f} min wall) to {out}")
    return info


# ---- accuracy through the deployed code path ---------------------------------------------------
class Answerer:
    """PromptBuilder + VisionEncoder + PrunedPrefill(ratio) + FullDecoder: the serving path."""

    def __init__(self, model_dir, pop_ratio: float = 0.0, max_new_tokens: int = 12):
        from .decoder import FullDecoder
        from .encoder import VisionEncoder
        from .prefill import PrunedPrefill
        from .prompt import PromptBuilder

        self.builder = PromptBuilder(model_dir)
        self.encoder = VisionEncoder(model_dir, dtype="float32")
        self.prefill = PrunedPrefill(model_dir, pop_ratio, dtype="float32")
        self.decoder = FullDecoder(model_dir, pop_ratio, dtype="float32", max_seqs=16, max_seq_len=512)
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def answer(self, samples: list[synthvqa.Sample]) -> list[str]:
        from .prefill import PrefillRequest
        from .sampling import SamplingParams

        reqs = []
        for s in samples:
            p = self.builder.build(s.messages(), [s.image])
            feats = self.encoder.encode_pixels(p.pixels)
            reqs.append(PrefillRequest(p.input_ids, p.mm_token_type_ids, feats))
        handoffs = self.prefill.prefill(reqs)
        outs = self.decoder.generate(handoffs, SamplingParams(max_new_tokens=self.max_new_tokens),
                                     stop_token_ids=self.builder.eos_token_ids)
        texts = []
        for ids in outs:
            if ids and ids[-1] in self.builder.eos_token_ids:
                ids = ids[:-1]
            texts.append(self.builder.tokenizer.decode(ids, skip_special_tokens=True))
        return texts


def accuracy(model_dir, samples, pop_ratio: float = 0.0, batch: int = 8) -> tuple[float, list[str]]:
    a = Answerer(model_dir, pop_ratio)
    texts = []
    for i in range(0, len(samples), batch):
        texts += a.answer(samples[i: i + batch])
    ok = [synthvqa.is_correct(t, s.answer) for t, s in zip(texts, samples)]
    return sum(ok) / len(ok), texts


def by_kind(samples, texts) -> dict[str, dict]:
    """Accuracy per question kind: {kind: {"n": .., "accuracy": ..}}."""
    out: dict[str, list[bool]] = {}
    for s, t in zip(samples, texts):
        out.setdefault(s.kind, []).append(synthvqa.is_correct(t, s.answer))
    return {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 3)} for k, v in sorted(out.items())}


def run_train_cli(args) -> int:
    torch.set_num_threads(args.threads)
    info = train(args.family, args.out, args.steps, args.batch_size, args.lr, args.layers, args.seed,
                 args.threads, warmup=args.warmup, max_minutes=args.max_minutes, init_from=args.init_from,
                 data_seed=args.data_seed, vision_lr_mult=args.vision_lr_mult, procs=args.procs)
    if args.heldout:
        heldout = synthvqa.make_dataset(args.heldout, synthvqa.HELDOUT_SEED)
        acc, texts = accuracy(args.out, heldout)
        info["heldout_accuracy"] = acc
        info["heldout_n"] = args.heldout
        info["heldout_by_kind"] = by_kind(heldout, texts)
        (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2))
        print(f"held-out accuracy (n={args.heldout}, seed {synthvqa.HELDOUT_SEED}, full model): {acc:.3f}")
    return 0
