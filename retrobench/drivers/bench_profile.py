"""Where a decode step's GPU time goes: kernel-time sums and kernel counts per kind of kernel.

``python -m retrobench bench profile`` (on a GPU) builds the bench's Llama-3.1-8B-shaped random
model, fills a cache as ``bench_decode`` does, and runs a few eager decode steps (the same kernels
a CUDA graph replays, launched one by one) of full, quest and retro under ``torch.profiler``. Per
method it writes the GPU kernel time per step, the number of kernels per step, and both split by
kind: projections (cuBLAS / CUTLASS GEMMs), fused elementwise (inductor's Triton kernels, with
``engine.compile``), retrobench's Triton kernels (attention, Quest scores, page min/max, retro upkeep),
top-k / sort, index / scatter / gather, copies and other elementwise kernels, the rest. The floor
column of ``decode.md`` says how far the sum is from the bytes a step must read.

Rows go to ``<out>/profile.csv`` (method, kind, kernel, per-step count and microseconds) and the
summary to ``<out>/profile.md``; ``--phase prefill`` profiles one prefill instead (``--methods``, default full;
``profile_prefill.*``), with SDPA's attention kernels as their own kind.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import torch

from retrobench.drivers.bench_decode import fill_cache, load_random_model, make_method
from retrobench.engine import Engine
from retrobench.store.results import environment

#: (kind, substrings of the kernel name), first match wins.
KINDS = (
    ("retrobench triton", ("_sparse_paged_attention", "_reduce_splits", "_quest_page_scores", "_update_page_minmax",
                           "_paged_logits", "_mark_loaded", "_retro_merge", "_retro_upkeep", "_write_kv")),
    ("SDPA attention (prefill)", ("flash", "fmha", "efficient_attention", "attention_kernel")),
    ("projections (GEMM)", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("top-k / sort", ("topk", "sort", "radix")),
    ("index / scatter / gather", ("index", "scatter", "gather")),
    ("copy / elementwise", ("elementwise", "copy", "fill", "reduce", "cat", "where")),
)  # fmt: skip
CASES = (("full", None, 1), ("quest", {"tokens": 2048}, 1), ("retro", {"tokens": 2048}, 2), ("retro", {"tokens": 2048}, 8))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


def kernel_times(run, repeats: int) -> dict[str, tuple[int, float]]:
    """Per CUDA kernel name: (launches, microseconds) per call of ``run()``, over ``repeats`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out[event.name][0] += 1
            out[event.name][1] += event.device_time
    return {k: (round(n / repeats), us / repeats) for k, (n, us) in out.items()}


def profile_prefill(engine: Engine, context: int) -> dict[str, tuple[int, float]]:
    """Per kernel name: (launches, microseconds) of one batch-1 prefill of ``context`` tokens."""
    ids = torch.randint(0, 1000, (1, context), device=engine.device)
    engine.prefill(engine.new_request(context + 16), ids)  # warm up
    return kernel_times(lambda: engine.prefill(engine.new_request(context + 16), ids), 1)


def profile_step(engine: Engine, context: int, batch: int, steps: int) -> dict[str, tuple[int, float]]:
    """Per kernel name: (launches per step, microseconds per step) over ``steps`` eager decode steps."""
    S = engine.method.reprocess_window
    request = engine.new_request(context, batch)
    fill_cache(engine, request, context - 1)
    positions = torch.arange(context - S, context).expand(batch, S).contiguous()
    ids = torch.randint(0, 256, (batch, S), device=engine.device)
    for _ in range(3):  # compile, warm up
        engine.forward(request, ids, positions, "decode", S + 8)
    return kernel_times(lambda: engine.forward(request, ids, positions, "decode", S + 8), steps)


def summary_lines(rows: list[dict]) -> list[str]:
    """Markdown per method, from the CSV's rows: kernel time and count by kind, the 8 largest kernels
    (also how a table is rendered again from a ``profile.csv`` whose markdown was lost)."""
    lines: list[str] = []
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for r in mine:
            kinds[r["kind"]][0] += int(r["count"])
            kinds[r["kind"]][1] += float(r["us"])
        n, us = sum(int(r["count"]) for r in mine), sum(float(r["us"]) for r in mine)
        top = sorted(mine, key=lambda r: -float(r["us"]))[:8]
        lines += [f"## {label}: {us / 1e3:.3f} ms of kernel time in {n} kernels", "", "| kind | kernels | ms |", "|---|---|---|"]
        lines += [f"| {k} | {c} | {t / 1e3:.3f} |" for k, (c, t) in sorted(kinds.items(), key=lambda kv: -kv[1][1])]
        lines += ["", "Largest kernels: " + "; ".join(f"`{r['kernel'][:60]}` x{r['count']} {float(r['us']) / 1e3:.3f} ms"
                                                      for r in top), ""]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrobench bench profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench", help="folder for profile.csv and profile.md")
    parser.add_argument("--model", default="llama31_8b_random")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="profiled decode steps per method")
    parser.add_argument("--compile", choices=("on", "off"), default="on", help="engine.compile of the profiled steps")
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                        help="profile decode steps (full, quest, retro) or one prefill of --context tokens")  # fmt: skip
    parser.add_argument("--methods", default="full",
                        help="--phase prefill: comma-separated methods, each with its own defaults (e.g. full,infllm)")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_profile profiles CUDA kernels: run it on a GPU")
        return 2
    env = environment("triton", "cuda")
    model = load_random_model(args.model, "cuda", torch.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, budget, window in CASES if args.phase == "decode" else [(m, None, 1) for m in args.methods.split(",")]:
        method = make_method(name, budget, window, dense_layers=2)
        engine = Engine(model, method, page_size=16, backend="triton", cuda_graphs=False, compile=args.compile == "on")
        if args.phase == "decode":
            kernels = profile_step(engine, args.context, args.batch, args.steps)
        else:
            kernels = profile_prefill(engine, args.context)
        label = f"{name} w={window}" if name == "retro" else name
        for kernel, (n, us) in kernels.items():
            rows.append({"method": label, "kind": kind_of(kernel), "kernel": kernel[:200], "count": n, "us": round(us, 2)})
        total_n, total_us = sum(n for n, _ in kernels.values()), sum(us for _, us in kernels.values())
        print(f"{label}: {total_us / 1e3:.3f} ms of kernels in {total_n} kernels", flush=True)
        del engine
        torch.cuda.empty_cache()
    stem = "profile" if args.phase == "decode" else "profile_prefill"
    with (out / f"{stem}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("method", "kind", "kernel", "count", "us"))
        writer.writeheader()
        writer.writerows(rows)
    what = (f"eager decode steps, per step (mean of {args.steps}); budget 2048 tokens, 2 dense layers"
            if args.phase == "decode" else "one prefill (engine.prefill_chunk=auto), batch 1")
    lines = [f"# {args.phase.capitalize()} kernel profile ({env['device_name']}, {args.model}, context {args.context}, "
             f"batch {args.batch if args.phase == 'decode' else 1})", "",
             f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha'] or 'n/a'}; engine.compile "
             f"{args.compile}; {what}; under torch.profiler.", ""]  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines + summary_lines(rows)) + "\n")
    print(f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
