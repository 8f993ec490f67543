"""POP on the trained SynthVQA models: `popserve eval` + `popserve importance`, one thread.

    .venv/bin/python bench/eval_trained.py --family qwen3-vl [--n 100] [--samples 64]

Writes docs/trained/<family>/{heldout.jsonl, eval/results.{json,md,png}, importance/importance.{json,png},
table.md}. table.md scores every variant with the SynthVQA metric (normalized exact match of the
generated answer), overall and split into image-only vs image+text-facts questions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from popserve.models import synthvqa  # noqa: E402
from popserve.service.cli import main as popserve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATIOS = "0.2,0.25,0.33,0.4,0.5"
CONTEXT_KINDS = synthvqa.CONTEXT_KINDS


def table(res: dict, kinds: list[str]) -> str:
    rows = res["per_row"]
    names = [v["name"] for v in res["variants"]]
    by = {v["name"]: v for v in res["variants"]}

    def acc(name, pick):
        idx = [i for i, k in enumerate(kinds) if pick(k)]
        ok = [synthvqa.is_correct(rows[i]["outputs"][name], rows[i]["answer"]) for i in idx]
        return f"{100 * sum(ok) / len(ok):.1f}%" if ok else "n/a"

    n_ctx = sum(k in CONTEXT_KINDS for k in kinds)
    out = [f"{res['family']}, {res['num_layers']} decoder layers, {res['rows']} held-out questions "
           f"({res['rows'] - n_ctx} image-only, {n_ctx} image + facts in the text); greedy.", "",
           "| variant | ratio | k | accuracy | image-only | image+text facts | first-token agree | KL(full ‖ variant) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        v = by[name]
        kl = "0" if v["kind"] == "full" else f"{v['mean_kl']:.3g}"
        out.append(f"| {v['kind']} | {v['ratio']:g} | {v['k']} | {acc(name, lambda k: True)} | "
                   f"{acc(name, lambda k: k not in CONTEXT_KINDS)} | {acc(name, lambda k: k in CONTEXT_KINDS)} | "
                   f"{100 * v['first_token_agreement']:.1f}% | {kl} |")
    return "\n".join(out) + "\n"


def summary(res: dict) -> str:
    """The README's compact form: one row per ratio, accuracy (and KL to the full model) per variant."""
    rows = res["per_row"]
    cols = ["pop", "pop-no-kv", "pop-no-boundary", "stage-agnostic"]
    by = {(v["kind"], round(v["ratio"], 3)): v for v in res["variants"]}

    def acc(v):
        ok = [synthvqa.is_correct(r["outputs"][v["name"]], r["answer"]) for r in rows]
        return 100 * sum(ok) / len(ok)

    full = by[("full", 0.0)]
    out = [f"{res['family']} ({res['num_layers']} layers, {res['rows']} held-out questions): full model {acc(full):.0f}%.", "",
           "| ratio (k) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for ratio in sorted({round(v["ratio"], 3) for v in res["variants"] if v["kind"] != "full"}):
        cells = []
        for c in cols:
            v = by.get((c, ratio))
            cells.append(f"{acc(v):.0f}% ({v['mean_kl']:.1g})" if v else "")
        k = by[("pop", ratio)]["k"]
        out.append(f"| {ratio:g} ({k}) | " + " | ".join(cells) + " |")
    out += ["", "Accuracy on the held-out questions; in brackets the mean KL(full ‖ variant) over the first "
            f"{res['kl_steps']} decode steps."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True, choices=["qwen3-vl", "gemma3"])
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-importance", action="store_true")
    args = ap.parse_args()
    model = args.model or str(ROOT / "models" / "checkpoints" / f"{args.family}-shapes")
    out = ROOT / "docs" / "trained" / args.family
    out.mkdir(parents=True, exist_ok=True)
    samples = synthvqa.make_dataset(args.n, synthvqa.EVAL_SEED)
    data = synthvqa.write_jsonl(out / "heldout.jsonl", samples)
    if not args.skip_eval:
        rc = popserve(["eval", "--model", model, "--data", str(data), "--ratios", RATIOS,
                       "--max-new-tokens", "8", "--kl-steps", "4", "--out", str(out / "eval")])
        if rc:
            return rc
        res = json.loads((out / "eval" / "results.json").read_text())
        md = table(res, [s.kind for s in samples])
        (out / "table.md").write_text(md)
        (out / "summary.md").write_text(summary(res))
        print(md)
    if not args.skip_importance:
        rc = popserve(["importance", "--model", model, "--data", str(data), "--samples", str(args.samples),
                       "--max-new-tokens", "8", "--out", str(out / "importance")])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
