"""`popserve` command line: serve, make-tiny, importance, eval, train."""
from __future__ import annotations

import argparse
import sys


def _cmd_make_tiny(args) -> int:
    from popserve.models.tiny import make_tiny

    out = make_tiny(args.family, args.size, args.out_dir, seed=args.seed, device=args.device)
    print(f"wrote {args.size} {args.family} checkpoint to {out}")
    return 0


def _load_config(path: str):
    """ServeConfig.from_yaml with one-line errors that name the file."""
    import yaml
    from pydantic import ValidationError

    from popserve.service.config import ServeConfig

    try:
        return ServeConfig.from_yaml(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ValueError(f"--config {path} is not valid YAML: {what}{where}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not a UTF-8 text file") from None
    except ValidationError as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path} is a directory; expected a YAML file") from None
    except FileNotFoundError:
        raise ValueError(f"--config {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read --config {path}: {exc.strerror or exc}") from None


def _cmd_serve(args) -> int:
    from popserve.service.config import ServeConfig
    from popserve.service.launcher import StartupError, serve_forever

    cfg = _load_config(args.config) if args.config else ServeConfig()
    overrides = {k: v for k, v in {
        "model": args.model, "pop_ratio": args.pop_ratio, "dtype": args.dtype, "device": args.device,
        "host": args.host, "port": args.port,
    }.items() if v is not None}
    cfg = ServeConfig.model_validate({**cfg.model_dump(), **overrides})
    try:
        return serve_forever(cfg)
    except StartupError as exc:  # the port is taken, pop_ratio too large for the model, a stage failed...
        print(f"popserve: error: {exc}", file=sys.stderr)
        return 2


def _cmd_importance(args) -> int:
    from popserve.models.importance import run_importance_cli

    return run_importance_cli(args)


def _cmd_eval(args) -> int:
    from popserve.models.evaluate import run_eval_cli

    return run_eval_cli(args)


def _cmd_train(args) -> int:
    from popserve.models.train import run_train_cli

    return run_train_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popserve", description="Disaggregated POP serving for Qwen3-VL and Gemma-3")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API on a local (or existing) Ray cluster")
    s.add_argument("--config", help="YAML file validated by popserve.service.config.ServeConfig")
    s.add_argument("--model", help="checkpoint directory or hub id (default: the offline default model)")
    s.add_argument("--pop-ratio", type=float, help="fraction of decoder layers skipped in prefill (0 = off)")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=_cmd_serve)

    t = sub.add_parser("make-tiny", help="write a random-weight checkpoint that loads offline")
    t.add_argument("--family", required=True, choices=["qwen3-vl", "gemma3"])
    t.add_argument("--size", default="tiny", choices=["tiny", "bench", "8b"],
                   help="8b: Qwen3-VL-8B's shape, drawn in bf16 (use --device cuda)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="where the random weights are drawn")
    t.add_argument("out_dir")
    t.set_defaults(func=_cmd_make_tiny)

    i = sub.add_parser("importance", help="stage-aware layer importance with virtual gates (POP Sec. 3)")
    i.add_argument("--model", required=True)
    i.add_argument("--data", required=True, help="JSONL of chat rows")
    i.add_argument("--samples", type=int, default=200)
    i.add_argument("--max-new-tokens", type=int, default=32)
    i.add_argument("--dtype", default="float32")
    i.add_argument("--device", default="cpu")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the self-generated responses (0 = greedy)")
    i.add_argument("--threshold", type=float, default=0.05,
                   help="suggested k: largest k whose last k layers hold at most this share of prefill importance")
    i.add_argument("--out", required=True)
    i.set_defaults(func=_cmd_importance)

    e = sub.add_parser("eval", help="POP fidelity: full vs POP variants on the same prompts")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="JSONL of chat rows (optional 'answer')")
    e.add_argument("--ratios", default="0.2,0.33,0.5")
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--kl-steps", type=int, default=8)
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_cmd_eval)

    tr = sub.add_parser("train", help="train a small model from scratch on SynthVQA shapes (CPU)")
    tr.add_argument("--family", required=True, choices=["qwen3-vl", "gemma3"])
    tr.add_argument("--out", required=True)
    tr.add_argument("--steps", type=int, default=2400)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--layers", type=int, default=12)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    tr.add_argument("--procs", type=int, default=1,
                    help="data-parallel training processes, one per core (--batch-size is per process)")
    tr.add_argument("--max-minutes", type=float, default=28.0,
                    help="CPU-time budget per process (minutes of one core); past it the schedule anneals and training stops")
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument("--vision-lr-mult", type=float, default=1.0, help="lr multiplier of the vision tower + projector")
    tr.add_argument("--init-from", help="continue training this checkpoint (a second stage)")
    tr.add_argument("--data-seed", type=int, help="seed of the training stream (default: --seed)")
    tr.add_argument("--heldout", type=int, default=200, help="held-out questions scored at the end (0: skip)")
    tr.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"popserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
