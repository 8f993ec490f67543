"""Stage-aware layer importance with virtual gates (POP paper Sec. 3.1-3.2; ../shared/POP.md).

Every decoder layer l gets two scalar gates on both of its residual branches:

    y = x + g * Attn(norm(x));   x' = y + g * MLP(norm(y))        (Gemma-3: g * post_norm(branch))

with g = g_pre[l] at the prefill positions t_1..t_{N-1} and g = g_dec[l] from t_N on. The gates
multiply only the branch outputs, so a layer with its prefill gate at 0 is the identity for the
prompt tokens yet still computes K/V from its input: exactly POP's skipped layer with its
independent K/V projection. (Decode tokens at g_dec = 1 then attend to those K/V, as in POP.)

`GatedLM` runs that model for one prompt (+ continuation), with a small growing KV cache for
generation. Importance is the Fisher estimate I[l] = E[(dLoss/dg[l])^2] at g = 1, with the response
sampled from the model itself and Loss = mean cross-entropy over the response tokens.

The same gated model expresses POP's ablations as gate settings (models/evaluate.py):
POP = prefill gates 0 on the last k layers; stage-agnostic pruning = both gates 0; no boundary
handling = t_N takes the prefill gates; no independent K/V = decode queries of the skipped layers
are masked off the prompt keys.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .families import Family, ImageFeatures
from .families.base import get_module
from .loading import load_checkpoint, take
from .masks import decode_masks, prefill_masks
from .sampling import SamplingParams, sample

DEFAULT_THRESHOLD = 0.05  # suggested k: the last k layers hold at most 5% of the prefill importance


# ---- the gated decoder layer --------------------------------------------------------------------
def gated_layer(layer: nn.Module, x: torch.Tensor, gate: torch.Tensor | float, **attn_kwargs) -> torch.Tensor:
    """One HF decoder layer (Qwen3-VL or Gemma-3) with `gate` [.., S, 1] on both residual branches.
    gate == 1 reproduces the layer's own forward exactly (tests/test_importance.py checks this)."""
    a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **attn_kwargs)
    if getattr(layer, "pre_feedforward_layernorm", None) is not None:  # Gemma-3: sandwich norms
        y = x + gate * layer.post_attention_layernorm(a)
        return y + gate * layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(y)))
    y = x + gate * a  # Qwen3-VL: post_attention_layernorm is the MLP's pre-norm
    return y + gate * layer.mlp(layer.post_attention_layernorm(y))


@dataclass
class Gates:
    """Gate values of one forward pass. pre/dec: [L] (may require grad).

    boundary=True: t_N (the last prompt token) takes the decode gates: POP's boundary handling.
    boundary=False: t_N takes the prefill gates, i.e. it is part of the pruned prefill.
    hide_prompt_kv: layers whose decode-phase queries see no prefill-phase keys (the ablation
    "without independent KV projections": those layers hold no prompt K/V at all)."""

    pre: torch.Tensor
    dec: torch.Tensor
    boundary: bool = True
    hide_prompt_kv: frozenset = frozenset()

    @classmethod
    def ones(cls, num_layers: int, requires_grad: bool = False) -> "Gates":
        return cls(torch.ones(num_layers, requires_grad=requires_grad),
                   torch.ones(num_layers, requires_grad=requires_grad))

    @classmethod
    def pruned(cls, num_layers: int, k: int, prefill: bool = True, decode: bool = False,
               boundary: bool = True, hide_prompt_kv: bool = False) -> "Gates":
        """Gates 0 on the last k layers in the chosen stages."""
        pre, dec = torch.ones(num_layers), torch.ones(num_layers)
        if k:
            if prefill:
                pre[-k:] = 0
            if decode:
                dec[-k:] = 0
        hide = frozenset(range(num_layers - k, num_layers)) if hide_prompt_kv else frozenset()
        return cls(pre, dec, boundary, hide)


class GrowingCache:
    """Stands in for a transformers Cache: per layer, K/V of every position seen so far.
    update() concatenates into new tensors, so fork() (a shallow copy) branches a continuation."""

    def __init__(self, num_layers: int):
        self.kv: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers

    def update(self, k, v, layer_idx, *args, **kwargs):
        old = self.kv[layer_idx]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def fork(self) -> "GrowingCache":
        c = GrowingCache(0)
        c.kv = list(self.kv)
        return c

    @property
    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]


@dataclass
class GatedPrompt:
    """One prompt prepared for GatedLM: token ids, encoded images and rope positions."""

    input_ids: torch.Tensor  # [N] long, cpu
    images: list[ImageFeatures] = field(default_factory=list)
    mm_token_type_ids: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None  # [R, N]
    rope_delta: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class RunResult:
    tokens: list[int]  # generated
    logits: torch.Tensor  # [len(tokens), V] float32: the distribution each token was chosen from
    forced_logits: Optional[torch.Tensor] = None  # [len(forced), V] under teacher forcing


class GatedLM:
    """The whole text model (+ vision tower, LM head) with virtual gates. Built from the family
    adapter's pieces (embedding, positions, rotary tables, masks, visual injection), like the
    production runners in prefill.py / decoder.py, so every family works the same way."""

    def __init__(self, model: str | Path, dtype: str = "float32", device: str = "cpu"):
        double = dtype == "float64"  # for gradient checks in tests
        loaded = load_checkpoint(model, "float32" if double else dtype, device)
        hf = loaded.model.double() if double else loaded.model
        hf.requires_grad_(False)
        self.family: Family = loaded.family
        self.model_dir = loaded.model_dir
        self.fingerprint = loaded.fingerprint
        self.device = loaded.device
        self.dtype = torch.float64 if double else loaded.dtype
        self.text = get_module(hf, self.family.text_path).to(self.device)
        self.lm_head = hf.lm_head.to(self.device)
        self.vision = take(hf, self.family.vision_paths, self.device)
        self.num_layers = self.family.num_layers

    # ---- inputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor, mm_token_type_ids=None, pixels=(),
                images: Optional[list[ImageFeatures]] = None) -> GatedPrompt:
        """Token ids + pixels (PromptBuilder output) or already-encoded images -> GatedPrompt."""
        if images is None:
            images = self.family.encode_pixels(self.vision, list(pixels)) if pixels else []
        grids = [f.grid_thw for f in images if f.grid_thw is not None]
        pos, delta = self.family.positions(input_ids, mm_token_type_ids, grids)
        return GatedPrompt(input_ids.cpu(), images, mm_token_type_ids, pos, delta)

    def _positions(self, p: GatedPrompt, start: int, n: int) -> torch.Tensor:
        idx = torch.arange(start, start + n)
        rows = p.positions.shape[0]
        after = (idx[idx >= p.num_tokens] + p.rope_delta).view(1, -1).expand(rows, -1)
        pos = torch.cat([p.positions[:, start:start + n], after], dim=1)
        return self.family.batch_positions([pos], n).to(self.device)

    def _masks(self, p: GatedPrompt, ids: torch.Tensor, start: int, n: int, boundary: int,
               hide: frozenset) -> list[Optional[torch.Tensor]]:
        """Per layer, the attention mask of queries start..start+n-1 over keys 0..start+n-1."""
        fam, dev = self.family, self.device
        if start == 0:  # the prompt (+ maybe a continuation): the prefill rules (image blocks...)
            blocks = fam.image_blocks(ids) if p.images else None
            by_type = prefill_masks(fam, [n], n, blocks, dev)
        else:  # continuation: each query row is a decode step at its own cache index
            q = torch.arange(start, start + n, device=dev)
            by_type = {t: m[:, 0, 0, :].view(1, 1, n, start + n)
                       for t, m in decode_masks(fam, q, start + n).items()}
        masks = [by_type[t] for t in fam.layer_types]
        if hide:
            q = torch.arange(start, start + n, device=dev)[:, None]
            k = torch.arange(start + n, device=dev)[None, :]
            keep = ~((q >= boundary) & (k < boundary))  # decode queries lose the prompt keys
            causal = (k <= q).view(1, 1, n, start + n)
            for i in hide:
                masks[i] = (causal if masks[i] is None else masks[i]) & keep
        return masks

    # ---- the forward ---------------------------------------------------------------------------
    def forward(self, p: GatedPrompt, ids: torch.Tensor, start: int, gates: Gates,
                cache: Optional[GrowingCache] = None, logits_from: int = 0) -> torch.Tensor:
        """Tokens `ids` [n] at cache indices start..start+n-1 (start 0: they begin with the prompt).
        Returns logits [n - logits_from, V] (float32, or float64 for a float64 model) of positions
        start+logits_from onward."""
        fam, text, dev = self.family, self.text, self.device
        n = ids.numel()
        ids = ids.view(1, n).to(dev)
        hidden = fam.embed(text, ids)
        visual = None
        if start == 0 and p.images:
            visual = self._place_images(p, ids, hidden)
        pe = fam.rotary(text, hidden, self._positions(p, start, n))
        boundary = p.num_tokens - 1 if gates.boundary else p.num_tokens
        masks = self._masks(p, ids, start, n, boundary, gates.hide_prompt_kv)
        is_pre = (torch.arange(start, start + n, device=dev) < boundary).view(1, n, 1)
        pre, dec = gates.pre.to(dev), gates.dec.to(dev)
        for i, layer in enumerate(text.layers):
            gate = torch.where(is_pre, pre[i], dec[i]).to(hidden.dtype)
            hidden = gated_layer(layer, hidden, gate, position_embeddings=pe[fam.layer_types[i]],
                                 attention_mask=masks[i], cache=cache)
            hidden = fam.inject_visual(hidden, i, visual)
        logits = self.lm_head(text.norm(hidden[0, logits_from:]))
        return logits if logits.dtype == torch.float64 else logits.float()

    def _place_images(self, p: GatedPrompt, ids, hidden):
        mask = ids == self.family.image_token_id
        joined = torch.cat([f.data.to(hidden.device, hidden.dtype) for f in p.images], dim=1)
        if joined.shape[1] != int(mask.sum()):
            raise ValueError(f"prompt has {int(mask.sum())} image tokens but images give {joined.shape[1]} features")
        hidden[mask] = joined[0]
        return (mask, list(joined[1:])) if joined.shape[0] > 1 else None

    # ---- generation and teacher forcing --------------------------------------------------------
    @torch.no_grad()
    def run(self, p: GatedPrompt, gates: Gates, max_new_tokens: int = 16, stop_token_ids=(),
            params: Optional[SamplingParams] = None, forced: Optional[list[int]] = None,
            generate: bool = True) -> RunResult:
        """Prompt pass once; then (a) generate up to max_new_tokens (greedy unless `params` say
        otherwise), and/or (b) teacher-force `forced`, the logits of step j given forced[:j]."""
        n = p.num_tokens
        cache = GrowingCache(self.num_layers)
        first = self.forward(p, p.input_ids, 0, gates, cache, logits_from=n - 1)  # [1, V]
        tokens, logits = [], [first[0]]
        if generate:
            params = params or SamplingParams(max_new_tokens=max_new_tokens)
            gen, c, stop = params.generator(), cache.fork(), set(stop_token_ids)
            while True:
                tok = sample(logits[-1][None], [params], [gen])[0][0]
                tokens.append(tok)
                if tok in stop or len(tokens) >= max_new_tokens:
                    break
                logits.append(self.forward(p, torch.tensor([tok]), n + len(tokens) - 1, gates, c)[0])
        forced_logits = None
        if forced:
            rest = (self.forward(p, torch.tensor(forced[:-1]), n, gates, cache.fork())
                    if len(forced) > 1 else first[:0])
            forced_logits = torch.cat([first, rest])
        return RunResult(tokens, torch.stack(logits[: len(tokens)]) if tokens else first[:0], forced_logits)

    def response_loss(self, p: GatedPrompt, response: list[int], gates: Gates) -> torch.Tensor:
        """Mean cross-entropy of `response` after the prompt, one teacher-forced pass."""
        seq = torch.cat([p.input_ids, torch.tensor(response[:-1], dtype=torch.long)])
        logits = self.forward(p, seq, 0, gates, None, logits_from=p.num_tokens - 1)
        return F.cross_entropy(logits, torch.tensor(response, device=logits.device))

    def gate_gradients(self, p: GatedPrompt, response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """dLoss/dg_pre, dLoss/dg_dec [L] at all gates 1."""
        dt = torch.float64 if self.dtype == torch.float64 else torch.float32
        ones = lambda: torch.ones(self.num_layers, dtype=dt, device=self.device, requires_grad=True)  # noqa: E731
        gates = Gates(ones(), ones())
        with torch.enable_grad():
            loss = self.response_loss(p, response, gates)
            g_pre, g_dec = torch.autograd.grad(loss, [gates.pre, gates.dec])
        return g_pre.detach().double().cpu(), g_dec.detach().double().cpu()


# ---- importance -------------------------------------------------------------------------------
def suggest_k(pre_importance: list[float], max_k: int, threshold: float = DEFAULT_THRESHOLD) -> int:
    """The largest k <= max_k such that the last k layers together hold at most `threshold` of the
    total prefill importance (normalized to sum 1). Since prefill positions of the last layer feed
    nothing (its K/V come from its input and no later layer reads its output), I_pre[L-1] = 0 and
    the rule always suggests k >= 1 when max_k >= 1."""
    total = sum(pre_importance)
    share = [x / total for x in pre_importance] if total > 0 else [0.0] * len(pre_importance)
    best, cum = 0, 0.0
    for k in range(1, max_k + 1):
        cum += share[-k]
        if cum <= threshold:
            best = k
        else:
            break
    return best


def _normalize(xs: list[float]) -> list[float]:
    s = sum(xs)
    return [x / s if s > 0 else 0.0 for x in xs]


def compute_importance(lm: GatedLM, prompts: Iterable[GatedPrompt], max_new_tokens: int = 32,
                       temperature: float = 1.0, seed: int = 0, stop_token_ids=(), progress=None) -> dict:
    """Fisher importance of the prefill and decode gates of every layer over `prompts` (an iterable,
    consumed one prompt at a time: only one prompt's graph and images are alive at once).

    For prompt i a response is sampled from the full model (temperature, seed + i; greedy at
    temperature 0), then one teacher-forced pass with all gates 1 gives dLoss/dg."""
    L = lm.num_layers
    sq_pre, sq_dec = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    per_sample_pre, per_sample_dec, lengths = [], [], []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        response = lm.run(p, Gates.ones(L), max_new_tokens, stop_token_ids, params).tokens
        g_pre, g_dec = lm.gate_gradients(p, response)
        sq_pre += g_pre**2
        sq_dec += g_dec**2
        per_sample_pre.append(g_pre**2)
        per_sample_dec.append(g_dec**2)
        lengths.append(len(response))
        if progress is not None:
            progress.update(1)
    n = max(len(lengths), 1)
    pre, dec = (sq_pre / n).tolist(), (sq_dec / n).tolist()

    def stderr(rows):
        if len(rows) < 2:
            return [0.0] * L
        return (torch.stack(rows).std(0) / math.sqrt(len(rows))).tolist()

    return dict(pre=pre, dec=dec, pre_stderr=stderr(per_sample_pre), dec_stderr=stderr(per_sample_dec),
                samples_used=len(lengths), mean_response_tokens=sum(lengths) / n)


def write_importance_png(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, dec = result["pre"], result["dec"]
    L = len(pre)
    positive = [x for x in pre + dec if x > 0]
    floor = min(positive) / 10 if positive else 1e-12
    layers = list(range(L))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * L + 2), 4.2))
    ax.semilogy(layers, [max(x, floor) for x in pre], "o-", label="prefill  $I^{pre}_l$")
    ax.semilogy(layers, [max(x, floor) for x in dec], "s-", label="decode  $I^{dec}_l$")
    k = result["suggested_k"]
    if k:
        ax.axvspan(L - k - 0.5, L - 0.5, color="tab:red", alpha=0.12, label=f"suggested skip (k={k})")
    ax.axhline(floor, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("E[(dLoss/dg)$^2$]  (log; 0 drawn at dotted floor)")
    ax.set_title(f"Stage-aware layer importance, {result['family']} ({result['samples_used']} samples)")
    ax.set_xticks(layers if L <= 40 else layers[::2])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_importance_cli(args) -> int:
    from tqdm import tqdm

    from .chat_rows import load_rows
    from .prompt import PromptBuilder

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.data)
    if not rows:
        raise ValueError(f"{args.data}: no rows")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    if len(rows) > args.samples:  # a seeded random subset, in file order
        keep = sorted(random.Random(args.seed).sample(range(len(rows)), args.samples))
        rows = [rows[i] for i in keep]
    device = _device(args.device)
    builder = PromptBuilder(args.model)
    lm = GatedLM(args.model, args.dtype, device)
    temperature = getattr(args, "temperature", 1.0)
    threshold = getattr(args, "threshold", DEFAULT_THRESHOLD)

    def prompts():
        for row in rows:
            pr = builder.build(row.messages, row.images)
            yield lm.prepare(pr.input_ids, pr.mm_token_type_ids, pr.pixels)

    bar = tqdm(total=len(rows), desc="importance", unit="sample", dynamic_ncols=True)
    try:
        result = compute_importance(lm, prompts(), args.max_new_tokens, temperature, args.seed,
                                    builder.eos_token_ids, progress=bar)
    finally:
        bar.close()

    L, fam = lm.num_layers, lm.family
    max_k = min(L - 1, L - fam.num_deepstack)
    k = suggest_k(result["pre"], max_k, threshold)
    paper_k = min(round(L / 3), max_k)
    result.update(
        model=str(args.model), family=fam.name, model_fingerprint=lm.fingerprint, num_layers=L,
        samples_requested=args.samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
        seed=args.seed, dtype=args.dtype,
        loss="mean cross-entropy over the sampled response tokens (response sampled from the model itself)",
        pre_normalized=_normalize(result["pre"]), dec_normalized=_normalize(result["dec"]),
        prefill_share=[p / (p + d) if p + d > 0 else 0.0 for p, d in zip(result["pre"], result["dec"])],
        suggested_k=k, suggested_ratio=k / L, threshold=threshold, max_k=max_k, paper_default_k=paper_k,
        suggested_k_rule=(f"largest k <= {max_k} whose last k layers hold <= {threshold:g} of the normalized "
                          "prefill importance (sum over layers L-k..L-1 of I_pre / sum I_pre)"),
        elapsed_s=round(time.time() - t0, 2),
    )
    result["layers"] = [
        dict(layer=i, pre=result["pre"][i], dec=result["dec"][i], pre_normalized=result["pre_normalized"][i],
             dec_normalized=result["dec_normalized"][i]) for i in range(L)
    ]
    (out / "importance.json").write_text(json.dumps(result, indent=2))
    write_importance_png(out / "importance.png", result)

    print(f"{'layer':>5}  {'I_pre':>11}  {'I_dec':>11}  {'pre %':>6}  {'dec %':>6}")
    for i in range(L):
        print(f"{i:>5}  {result['pre'][i]:>11.4e}  {result['dec'][i]:>11.4e}  "
              f"{100 * result['pre_normalized'][i]:>6.2f}  {100 * result['dec_normalized'][i]:>6.2f}")
    print(f"suggested k = {k} of {L} layers (ratio {k / L:.2f}; rule: {result['suggested_k_rule']})")
    print(f"paper default k = round(L/3) = {paper_k} (ratio {paper_k / L:.2f})")
    print(f"wrote {out / 'importance.json'} and {out / 'importance.png'} "
          f"({result['samples_used']} samples, {result['elapsed_s']:.1f}s)")
    return 0


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
