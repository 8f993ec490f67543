"""How prefill and decode replicas should share a CPU's cores, measured side by side in one run.

    python bench/threads.py [--family qwen3-vl] [--seconds 25]

Runs a prefill process (POP prefill of 512-token prompts, back to back) and a decode process
(FullDecoder steps at batch 8) at the same time, as the Prefill and Decode replicas do under load,
with each thread layout below, then each one alone. Prints ms per prefill and per decode step,
and the slowdown against running alone. OpenMP's default spin-waiting vs passive waiting is the
OMP_WAIT_POLICY the replicas get from service/deployments/common.py; a layout may give prefill and
decode different policies, and "SPIN<n>" means libgomp's spin-then-sleep with GOMP_SPINCOUNT=n.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import bench_checkpoint  # noqa: E402

LAYOUTS = [  # (prefill threads, decode threads, OMP_WAIT_POLICY of prefill, of decode)
    (2, 2, "ACTIVE", "ACTIVE"), (2, 1, "ACTIVE", "ACTIVE"), (1, 1, "ACTIVE", "ACTIVE"),
    (2, 2, "PASSIVE", "PASSIVE"), (2, 1, "PASSIVE", "PASSIVE"), (1, 1, "PASSIVE", "PASSIVE"),
    (2, 1, "ACTIVE", "PASSIVE"),  # a spinning prefill next to a passive decode
]


def worker(mode: str, threads: int, seconds: float, model: str, batch: int, go: Path) -> None:
    import torch

    from popserve.models.decoder import FullDecoder
    from popserve.models.prefill import PrefillRequest, PrunedPrefill
    from popserve.models.sampling import SamplingParams

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    pre = PrunedPrefill(model, pop_ratio=1 / 3)
    prompt = lambda: [PrefillRequest(torch.randint(100, 6000, (512,), generator=g))]  # noqa: E731
    if mode == "decode":
        dec = FullDecoder(model, pop_ratio=1 / 3, max_seqs=16, max_seq_len=2048)
        handoffs = [pre.prefill(prompt())[0] for _ in range(batch)]
        params = SamplingParams(max_new_tokens=1000)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        if mode == "decode":
            if not dec.running:
                for h in handoffs:
                    dec.add(h, params)
            dec.step()
        else:
            pre.prefill(prompt())
        n += 1
    print(f"result {(time.perf_counter() - t0) / n * 1000:.0f}", flush=True)


def run(layout: tuple, args, model: str) -> dict:
    """Start the processes of one layout (threads 0 = not run), release them together, collect ms/op."""
    go = Path(tempfile.mkdtemp()) / "go"
    procs = {}
    for mode, threads, policy in (("prefill", layout[0], layout[2]), ("decode", layout[1], layout[3])):
        if threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if policy.startswith("SPIN"):  # "SPIN10000": libgomp spins that long at a barrier, then sleeps
                env.pop("OMP_WAIT_POLICY", None)
                env["GOMP_SPINCOUNT"] = policy[4:]
            else:
                env["OMP_WAIT_POLICY"] = policy
            procs[mode] = subprocess.Popen(
                [sys.executable, __file__, "--worker", mode, "--threads", str(threads), "--seconds", str(args.seconds),
                 "--model", model, "--batch", str(args.batch), "--go", str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    out = {}
    for mode, p in procs.items():
        line = p.stdout.readline().split()
        p.wait()
        out[mode] = float(line[1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3-vl")
    ap.add_argument("--model")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--go")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, args.seconds, args.model, args.batch, Path(args.go))
        return 0

    model = bench_checkpoint(args.family, args.model)
    alone = {}
    for policy in ("ACTIVE", "PASSIVE"):
        for t in (1, 2):
            alone[("prefill", t, policy)] = run((t, 0, policy, policy), args, model)["prefill"]
            alone[("decode", t, policy)] = run((0, t, policy, policy), args, model)["decode"]
    print(f"{args.family} bench checkpoint, {os.cpu_count()} cores; prefill = one 512-token prompt (POP), "
          f"decode = one step at batch {args.batch}\n")
    print("| OMP_WAIT_POLICY (prefill / decode) | prefill threads | decode threads | prefill ms (x alone) | "
          "decode step ms (x alone) |")
    print("|---|---:|---:|---:|---:|")
    for policy in ("ACTIVE", "PASSIVE"):
        for t in (1, 2):
            print(f"| {policy} | {t} | - | {alone[('prefill', t, policy)]:.0f} (alone) | - |")
            print(f"| {policy} | - | {t} | - | {alone[('decode', t, policy)]:.0f} (alone) |")
    for layout in LAYOUTS:
        r = run(layout, args, model)
        pa, da = alone[("prefill", layout[0], layout[2])], alone[("decode", layout[1], layout[3])]
        policy = layout[2] if layout[2] == layout[3] else f"{layout[2]} / {layout[3]}"
        print(f"| {policy} | {layout[0]} | {layout[1]} | {r['prefill']:.0f} ({r['prefill'] / pa:.2f}x) | "
              f"{r['decode']:.0f} ({r['decode'] / da:.2f}x) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
