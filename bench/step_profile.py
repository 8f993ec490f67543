"""Where one prefill and one decode step spend their time: wall clock against the time the device's
kernels ran (torch.profiler), so a step that waits on Python and kernel launches shows apart from
one that waits on arithmetic. Also a decode step next to a running prefill (the stages share the
device and, in one process, the interpreter) and the prompt building a request pays first.

    python bench/step_profile.py --shape 8b --device cuda    # a GPU node (bench/gpu_engine.sh)
    python bench/step_profile.py --lengths 512               # the bench shape on this CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import checkpoint, model_arguments, what_model  # noqa: E402
from loadgen import text_prompt, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_times(fn, repeats: int) -> list[float]:
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return walls


def timed(fn, device, repeats: int) -> tuple[float, float, int]:
    """(median wall s, kernel s per call, kernel launches per call) of fn()."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    sync(device)
    walls = wall_times(lambda: (fn(), sync(device)), repeats)
    if device.type != "cuda":
        return statistics.median(walls), float("nan"), 0
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as exc:  # noqa: BLE001 - a node without CUPTI still gives the wall times
        print(f"profiler failed: {exc}", flush=True)
        return statistics.median(walls), float("nan"), 0
    return statistics.median(walls), sum(e.device_time_total for e in kernels) / 3 / 1e6, len(kernels) // 3


def main(argv=None) -> int:
    from popserve.models.decoder import FullDecoder
    from popserve.models.prefill import PrefillRequest, PrunedPrefill
    from popserve.models.prompt import PromptBuilder
    from popserve.models.sampling import SamplingParams

    ap = model_arguments(argparse.ArgumentParser())
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default bench/results/step-profile-<shape>-<device>.md")
    args = ap.parse_args(argv)
    model, _ = checkpoint(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    runners = {"POP": PrunedPrefill(model, args.ratio, args.dtype, args.device),
               "POP off": PrunedPrefill(model, 0.0, args.dtype, args.device)}
    t = time.perf_counter()
    decoder = FullDecoder(model, args.ratio, args.dtype, args.device, max_seqs=max(batches),
                          max_seq_len=max(lengths) + 128)
    load_s = time.perf_counter() - t
    graphs = decoder.graphs  # CUDA graphs of the decode step (GPU only); {} to time eager steps
    builder = PromptBuilder(model)
    dev = decoder.device
    rows = ["| what | wall (ms) | device kernels (ms) | kernel launches | kernels / wall |", "|---|---|---|---|---|"]

    def row(name, wall, kern, launches):
        busy = f"{kern / wall:.0%}" if kern == kern else "-"
        kern_ms = f"{kern * 1000:.1f}" if kern == kern else "-"
        rows.append(f"| {name} | {wall * 1000:.1f} | {kern_ms} | {launches or '-'} | {busy} |")
        print(rows[-1], flush=True)

    for n in lengths:
        text = text_prompt(builder.tokenizer, n, seed=n)
        messages = [{"role": "user", "content": text}]
        wall = statistics.median(wall_times(lambda: builder.build(messages), args.repeats))
        row(f"prompt building (chat template + tokenizer), {n} tokens", wall, float("nan"), 0)
        req = PrefillRequest(builder.build(messages).input_ids)
        for label, runner in runners.items():
            row(f"prefill {label}, {n} tokens", *timed(lambda r=runner: r.prefill([req]), dev, args.repeats))
        handoff = runners["POP"].prefill([req])[0]
        for b in batches:
            for _ in range(b):
                decoder.add(handoff, SamplingParams(max_new_tokens=60))
            modes = {"CUDA graphs": graphs, "eager": {}} if graphs else {"": {}}  # label -> decoder.graphs
            for label, decoder.graphs in modes.items():
                row(f"decode step, batch {b}, context {n}{', ' + label if label else ''}",
                    *timed(decoder.step, dev, args.repeats))
            if graphs:  # the graph's logits against the exact-shape eager step's, same inputs
                diff = (decoder.next_logits("auto") - decoder.next_logits("exact")).abs().max().item()
                rows.append(f"| decode logits, batch {b}, context {n}: CUDA graph vs eager, max abs difference "
                            f"| {diff:.3g} | | | |")
                print(rows[-1], flush=True)
            for seq in list(decoder.running):
                decoder.remove(seq.seq_id)
    decoder.graphs = graphs

    # A decode step while the other stage prefills in another thread of this process.
    n = max(lengths)
    req = PrefillRequest(builder.build([{"role": "user", "content": text_prompt(builder.tokenizer, n, 1)}]).input_ids)
    handoff = runners["POP"].prefill([req])[0]
    b = max(batches)
    for _ in range(b):
        decoder.add(handoff, SamplingParams(max_new_tokens=60))
    stop = threading.Event()

    def prefill_loop():
        while not stop.is_set():
            runners["POP off"].prefill([req])
            sync(dev)

    worker = threading.Thread(target=prefill_loop)
    worker.start()
    time.sleep(0.5)
    walls = wall_times(lambda: (decoder.step(), sync(dev)), args.repeats * 2)
    stop.set()
    worker.join()
    row(f"decode step, batch {b}, context {n}, next to a running {n}-token prefill", statistics.median(walls),
        float("nan"), 0)

    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = (f"One step at a time on {where}, torch {torch.__version__}, {what_model(args)} ("
            f"{decoder.family.num_layers} layers, POP skips {runners['POP'].k}), {str(decoder.dtype).split('.')[-1]}; "
            f"median of {args.repeats} (wall), mean of 3 profiled calls (kernels). Decoder loaded in {load_s:.1f} s"
            f"{f' with {len(graphs)} CUDA graphs captured' if graphs else ''}.\n\n" + "\n".join(rows) + "\n")
    write_report(args.out or f"bench/results/step-profile-{args.shape}-{dev.type}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
