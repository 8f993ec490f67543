"""`popserve eval`: how faithful is POP to the full model, and what do its parts buy?

Variants, all on the same prompts and images, greedy decoding:
  full            the full model: the production runners at k = 0 (PrunedPrefill(0) + FullDecoder)
  pop             POP at ratio r: the production runners (PrunedPrefill(r) + FullDecoder), i.e. the
                  deployed code; the last k = round(L*r) layers skipped in prefill
  pop-no-kv       POP without independent K/V projections: the skipped layers hold no prompt K/V,
                  so in those layers decode tokens (t_N on) attend only to decode-phase tokens
  pop-no-boundary POP without boundary handling: t_N is part of the pruned prefill and the first
                  generated token comes from the pruned pass's last hidden state (final norm +
                  LM head); full-depth decoding starts with that token
  stage-agnostic  the same k layers dropped in prefill AND decode (ShortGPT-style layer pruning)

The three ablations are gate settings of the virtual-gate model (models/importance.GatedLM, whose
POP setting is checked against the production runners in tests and, per ratio, in every eval run:
`engine_check` in results.json).

Metrics against the full model: first-token agreement; exact match of the greedy sequence;
mean KL(full || variant) of the next-token distributions over the first M decode steps, every
variant teacher-forced on the full model's tokens; task accuracy on rows with an `answer`
(generated text, stripped and lowercased, starts with the lowercased answer).
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .decoder import FullDecoder
from .importance import GatedLM, GatedPrompt, Gates, _device
from .prefill import PrefillRequest, PrunedPrefill
from .sampling import SamplingParams

KINDS = ("pop", "pop-no-kv", "pop-no-boundary", "stage-agnostic")
DESCRIPTIONS = {
    "full": "full model (production runners, k = 0)",
    "pop": "POP (production PrunedPrefill + FullDecoder)",
    "pop-no-kv": "POP without independent K/V projections (skipped layers hold no prompt K/V)",
    "pop-no-boundary": "POP without boundary handling (t_N in the pruned prefill, first token from it)",
    "stage-agnostic": "same layers dropped in prefill and decode (ShortGPT-style)",
}


def ablation_gates(num_layers: int, k: int) -> dict[str, Gates]:
    """The ablations of POP at k skipped layers, as virtual-gate settings."""
    return {
        "pop-no-kv": Gates.pruned(num_layers, k, hide_prompt_kv=True),
        "pop-no-boundary": Gates.pruned(num_layers, k, boundary=False),
        "stage-agnostic": Gates.pruned(num_layers, k, prefill=True, decode=True),
    }


# ---- the production decoder, greedy or teacher-forced ----------------------------------------
def decode(dec: FullDecoder, handoff, steps: int, stop_token_ids=(), forced: Optional[list[int]] = None):
    """Decode one handoff with the production FullDecoder. Greedy for up to `steps` tokens, or, with
    `forced`, teacher-forced: after step j the next input is forced[j] instead of its own choice.
    Returns (chosen tokens, logits [steps taken, V] float32), the logits read off the LM head."""
    if dec.num_running:
        raise RuntimeError("decode() reads the LM head's output row 0: the decoder must run nothing else")
    logits: list[torch.Tensor] = []
    seq_id = dec.add(handoff, SamplingParams(max_new_tokens=steps), () if forced is not None else stop_token_ids)
    seq = next(s for s in dec.running if s.seq_id == seq_id)
    hook = dec.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out[0].float()))
    tokens: list[int] = []
    try:
        while True:
            (out,) = [o for o in dec.step() if o.seq_id == seq_id]
            tokens.append(out.token)
            if out.finish_reason:  # the decoder has removed the sequence
                break
            if forced is not None:
                seq.next_token = forced[len(tokens) - 1]
    finally:
        hook.remove()
        dec.remove(seq_id)  # no-op when finished
    return tokens, torch.stack(logits)


# ---- metrics ---------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The one way every variant's logits become log-probs: float64, since float32 log-probs alone
    put a floor of ~1e-7 under KL (full vs full is exactly 0 this way)."""
    return torch.log_softmax(logits.double().cpu(), -1)


def kl_full_variant(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over steps of KL(full || variant); ref_logits: the full model's logits [M, V]."""
    m = ref_logits.shape[0]
    if m == 0:
        return 0.0
    p, q = log_probs(ref_logits), log_probs(logits[:m])
    return float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())


def is_correct(text: str, answer: str) -> bool:
    return text.strip().lower().startswith(answer.strip().lower())


@dataclass
class Reference:
    tokens: list[int]
    logits: torch.Tensor  # [M, V] the full model's logits of its first M steps, cpu float32
    text: str


@dataclass
class Tally:
    name: str
    kind: str
    ratio: float
    k: int
    first: list[bool] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, ref: Reference, tokens: list[int], forced_logits: torch.Tensor, text: str,
            answer: Optional[str]) -> None:
        self.first.append(bool(tokens) and bool(ref.tokens) and tokens[0] == ref.tokens[0])
        self.exact.append(tokens == ref.tokens)
        self.kl.append(kl_full_variant(ref.logits, forced_logits))
        if answer is not None:
            self.correct.append(is_correct(text, answer))
        self.texts.append(text)

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return dict(name=self.name, kind=self.kind, ratio=self.ratio, k=self.k, rows=len(self.exact),
                    first_token_agreement=mean(self.first), exact_match=mean(self.exact),
                    mean_kl=mean(self.kl), accuracy=mean(self.correct), answered_rows=len(self.correct))


# ---- the evaluation --------------------------------------------------------------------------
@dataclass
class EvalRow:
    prompt: GatedPrompt
    request: PrefillRequest
    answer: Optional[str]


def evaluate(model, rows, ratios: list[float], max_new_tokens: int = 16, kl_steps: int = 8,
             dtype: str = "float32", device: str = "cpu", progress=None) -> dict:
    """rows: ChatRow-like (messages, images, answer). Returns the results dict (results.json).
    progress: a tqdm bar (or None), advanced once per prompt per phase: prepare, full, each ratio."""
    from .prompt import PromptBuilder

    builder = PromptBuilder(model)
    lm = GatedLM(model, dtype, device)
    L, eos, tok = lm.num_layers, builder.eos_token_ids, builder.tokenizer
    text_of = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def tick(phase: str):
        if progress is not None:
            progress.set_postfix_str(phase, refresh=False)
            progress.update(1)

    data: list[EvalRow] = []
    for row in rows:
        pr = builder.build(row.messages, row.images)
        gp = lm.prepare(pr.input_ids, pr.mm_token_type_ids, pr.pixels)
        gp.images = [type(f)(f.data.cpu(), f.grid_thw) for f in gp.images]  # held for every variant
        data.append(EvalRow(gp, PrefillRequest(pr.input_ids, pr.mm_token_type_ids, gp.images), row.answer))
        tick("prepare")
    max_len = max(r.prompt.num_tokens for r in data) + max_new_tokens + 2
    dec = FullDecoder(model, 0.0, dtype, device, max_seqs=1, max_seq_len=max_len)

    # The full model, through the production runners at k = 0.
    refs: list[Reference] = []
    full = Tally("full", "full", 0.0, 0)
    pre = PrunedPrefill(model, 0.0, dtype, device)
    with torch.inference_mode():
        for r in data:
            tokens, logits = decode(dec, pre.prefill([r.request])[0], max_new_tokens, eos)
            m = min(kl_steps, len(tokens))
            ref = Reference(tokens, logits[:m].float().cpu(), text_of(tokens))
            refs.append(ref)
            full.add(ref, tokens, logits, ref.text, r.answer)
            tick("full")
    del pre
    tallies = [full]
    engine_check = {}
    for ratio in ratios:
        pre = PrunedPrefill(model, ratio, dtype, device)
        k = pre.k
        dec.accepted[pre.fingerprint] = k  # the decode path is the same for every k; serving pins one
        mine = {kind: Tally(f"{kind}@{ratio:g}", kind, ratio, k) for kind in KINDS}
        worst = 0.0
        with torch.inference_mode():
            for r, ref in zip(data, refs):
                forced = ref.tokens[: ref.logits.shape[0]]  # the full model's first M tokens (M >= 1)
                handoff = pre.prefill([r.request])[0]
                tokens, _ = decode(dec, handoff, max_new_tokens, eos)
                _, tf = decode(dec, handoff, len(forced), forced=forced)
                mine["pop"].add(ref, tokens, tf, text_of(tokens), r.answer)
                # The gate model's POP, teacher-forced the same way, must agree with production.
                own = lm.run(r.prompt, Gates.pruned(L, k), forced=forced, generate=False).forced_logits
                diff = log_probs(own) - log_probs(tf)
                worst = max(worst, float(diff.abs().max()))
                for kind, gates in ablation_gates(L, k).items():
                    res = lm.run(r.prompt, gates, max_new_tokens, eos, forced=forced)
                    mine[kind].add(ref, res.tokens, res.forced_logits, text_of(res.tokens), r.answer)
                tick(f"ratio {ratio:g}")
        engine_check[f"{ratio:g}"] = worst
        tallies.extend(mine.values())
        del pre
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    fam = lm.family
    return dict(
        model=str(model), family=fam.name, num_layers=L, rows=len(data), max_new_tokens=max_new_tokens,
        kl_steps=kl_steps, dtype=dtype, ratios=list(ratios),
        variants=[t.summary() for t in tallies],
        engine_check_max_abs_logprob_diff=engine_check,
        definitions=DESCRIPTIONS,
        per_row=[
            dict(index=i, answer=r.answer, prompt_tokens=r.prompt.num_tokens,
                 outputs={t.name: t.texts[i] for t in tallies})
            for i, r in enumerate(data)
        ],
    )


# ---- reports ---------------------------------------------------------------------------------
def _fmt(x, pct=True):
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def results_markdown(res: dict) -> str:
    lines = [
        f"# POP evaluation: {res['model']}",
        "",
        f"{res['family']}, {res['num_layers']} decoder layers; {res['rows']} prompts; greedy decoding of up to "
        f"{res['max_new_tokens']} tokens; KL over the first {res['kl_steps']} decode steps, every variant "
        "teacher-forced on the full model's tokens.",
        "",
        "| variant | ratio | k | first-token agree | exact match | KL(full ‖ variant) | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in res["variants"]:
        acc = _fmt(v["accuracy"]) + (f" (n={v['answered_rows']})" if v["answered_rows"] else "")
        lines.append(f"| {v['kind']} | {v['ratio']:g} | {v['k']} | {_fmt(v['first_token_agreement'])} | "
                     f"{_fmt(v['exact_match'])} | {_fmt(v['mean_kl'], pct=False)} | {acc} |")
    lines += ["", "Variants:", ""]
    lines += [f"- **{k}**: {d}" for k, d in res["definitions"].items()]
    check = ", ".join(f"r={r}: {d:.2e}" for r, d in res["engine_check_max_abs_logprob_diff"].items())
    lines += ["", f"Gate-model POP vs production POP, max |Δ log p| (teacher-forced): {check or 'n/a'}", ""]
    return "\n".join(lines)


def write_results_png(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = res["variants"]
    full = variants[0]
    metrics = [("first_token_agreement", "first-token agreement", False),
               ("exact_match", "greedy exact match", False), ("mean_kl", "KL(full ‖ variant)", True)]
    if full["answered_rows"]:
        metrics.append(("accuracy", "task accuracy", False))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], metrics):
        for kind, marker in zip(KINDS, "osD^"):
            pts = sorted((v["ratio"], v[key]) for v in variants if v["kind"] == kind and v[key] is not None)
            if pts:
                xs, ys = zip(*pts)
                if log:
                    ys = [max(y, 1e-8) for y in ys]
                ax.plot(xs, ys, marker=marker, label=kind)
        if key != "mean_kl" and full[key] is not None:
            ax.axhline(full[key], color="k", ls="--", lw=0.8, label="full")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("pruning ratio (k / L)")
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"POP fidelity, {res['family']} ({res['rows']} prompts)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    if not ratios:
        raise ValueError("--ratios is empty")
    return ratios


def run_eval_cli(args) -> int:
    from tqdm import tqdm

    from transformers import AutoConfig

    from .chat_rows import load_rows
    from .checkpoint import read_config, resolve_model_dir
    from .families import family_for
    from .pop import skipped_layer_count

    t0 = time.time()
    ratios = parse_ratios(args.ratios)
    if args.max_new_tokens < 1 or args.kl_steps < 1:
        raise ValueError("--max-new-tokens and --kl-steps must be >= 1")
    model_dir = resolve_model_dir(args.model)  # fail on a bad ratio before loading any weights
    read_config(model_dir)
    fam = family_for(AutoConfig.from_pretrained(model_dir))
    for r in ratios:
        skipped_layer_count(fam.num_layers, r, first_kept=fam.num_deepstack)
    rows = load_rows(args.data, args.limit)
    if not rows:
        raise ValueError(f"{args.data}: no rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # one tick per prompt: preparing it, the full model, then each ratio (POP + its ablations)
    bar = tqdm(total=len(rows) * (2 + len(ratios)), desc="eval", unit="prompt", dynamic_ncols=True)
    try:
        res = evaluate(args.model, rows, ratios, args.max_new_tokens, args.kl_steps, args.dtype,
                       _device(args.device), progress=bar)
    finally:
        bar.close()
    res["elapsed_s"] = round(time.time() - t0, 2)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = results_markdown(res)
    (out / "results.md").write_text(md)
    write_results_png(out / "results.png", res)
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'} ({res['elapsed_s']:.1f}s)")
    return 0
