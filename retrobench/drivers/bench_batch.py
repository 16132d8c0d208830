"""Throughput of a batched generation run against the same run at batch 1, through the CLI.

``python -m retrobench.bench_batch`` (``make gpu-batch`` on the GPU machine) runs one generation
task twice with ``python -m retrobench run``: at ``engine.batch_size=<B>`` (default ``auto``: as
many sequences as the GPU memory holds) and at ``engine.batch_size=1``, each in its own result
store, then writes ``<out>/batch.csv`` and ``.md``: samples, tokens generated, generation wall
time (the sum of the samples' ``wall_s``: at batch > 1 each is the time since the previous sample
finished, so they add up to the run's wall time), tokens/s, the speed-up, and how many samples
produced the same text at both batch sizes (bf16 matmuls on a GPU are not batch-invariant, so a
greedy near-tie may break differently; CPU tests prove equality in fp32). The batch-1 run gets
what is left of the deadline and may cover fewer samples: tokens/s is per token, so the two stay
comparable; the table says how many samples each covered.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

COLUMNS = ("method", "task", "batch_size", "samples", "new_tokens", "wall_s", "tokens_per_s", "speedup",
           "same_output", "compared", "model", "device", "git_sha")  # fmt: skip


def run(args: argparse.Namespace, batch: str, samples: int, results: Path, timeout: float) -> int:
    from retrobench.drivers.bench_cli import run_until

    return run_until(["run", f"model={args.model}", f"method={args.method}", f"task={args.task}",
                      f"task.num_samples={samples}", f"task.max_new_tokens={args.new_tokens}", f"device={args.device}",
                      f"engine.batch_size={batch}", f"results_dir={results}", *args.overrides], timeout, f"batch {batch}")  # fmt: skip


def read(results: Path) -> tuple[dict, list[dict]]:
    """The run's env.json and its finished sample rows (a run cut at the deadline has no metrics.json)."""
    (samples,) = (results / "runs").glob("*/samples.jsonl")
    env = json.loads((samples.parent / "env.json").read_text())
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return env, rows


def summarize(args: argparse.Namespace, env: dict, rows: list[dict], reference: list[dict] | None) -> dict:
    tokens = sum(int(r["new_tokens"]) for r in rows)
    wall = sum(float(r["wall_s"]) for r in rows)
    same = compared = None
    if reference is not None:
        ref = {r["id"]: r["output"] for r in reference}
        both = [r for r in rows if r["id"] in ref]
        compared, same = len(both), sum(r["output"] == ref[r["id"]] for r in both)
    return {
        "method": args.method, "task": args.task, "batch_size": rows[0].get("batch_size", 1) if rows else "",
        "samples": len(rows), "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None,
        "speedup": None, "same_output": same, "compared": compared, "model": args.model,
        "device": env.get("device_name", ""), "git_sha": env.get("git_sha", ""),
    }  # fmt: skip


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "batch.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    device, sha = (rows[0]["device"], rows[0]["git_sha"]) if rows else ("?", "?")
    lines = [f"# Batched generation run vs batch 1 ({device}, git {sha})", "",
             f"`python -m retrobench run model={args.model} method={args.method} task={args.task} "
             f"task.max_new_tokens={args.new_tokens} {' '.join(args.overrides)}` at each engine.batch_size; tokens/s = "
             "tokens generated / generation wall time (prefill included).", "",
             "| batch | samples | tokens | wall s | tokens/s | speed-up | same text as batch 1 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        same = f"{r['same_output']}/{r['compared']}" if r["compared"] is not None else "-"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['batch_size']} | {r['samples']} | {r['new_tokens']} | {r['wall_s']:.1f} | {tps} | {speed} | {same} |")
    (out / "batch.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrobench.bench_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama31_8b_random")
    parser.add_argument("--method", default="retro")
    parser.add_argument("--task", default="longgenbench")
    parser.add_argument("--samples", type=int, default=64, help="samples of the batched run")
    parser.add_argument("--samples-batch1", type=int, default=None, help="samples of the batch-1 run (default: same)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--batch", default="auto", help="engine.batch_size of the batched run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--results-dir", default="results/bench_batch", help="parent of the two run stores")
    parser.add_argument("--deadline-s", type=float, default=540.0)
    parser.add_argument("overrides", nargs="*", help="more config overrides for both runs")
    args = parser.parse_args(argv)
    start, root = time.perf_counter(), Path(args.results_dir)
    run(args, args.batch, args.samples, root / "batched", args.deadline_s)
    left = args.deadline_s - (time.perf_counter() - start)
    if left > 30:
        run(args, "1", args.samples_batch1 or args.samples, root / "batch1", left)
    rows, reference = [], None
    if (root / "batch1" / "runs").exists():
        env, reference = read(root / "batch1")
        single = summarize(args, env, reference, None)
    if (root / "batched" / "runs").exists():
        env, batched = read(root / "batched")
        rows.append(summarize(args, env, batched, reference))
    if reference is not None:
        rows.append(single)
        if rows[0] is not single and rows[0]["tokens_per_s"] and single["tokens_per_s"]:
            rows[0]["speedup"] = rows[0]["tokens_per_s"] / single["tokens_per_s"]
    write(rows, Path(args.out), args)
    print((Path(args.out) / "batch.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
