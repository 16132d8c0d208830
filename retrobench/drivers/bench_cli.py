"""End-to-end latency through the CLI: ``experiment=latency`` for every method on each backend.

``python -m retrobench.bench_cli`` (``make gpu-latency`` on the GPU machine) runs, for each backend
in turn, one Hydra multirun ``python -m retrobench run -m experiment=latency device=cuda
engine.backend=<b> method=<all> task.context_tokens=<C>`` (Llama-3.1-8B shape, random bf16
weights, a synthetic retrieval prompt of C tokens, fixed-length decode), then reads the finished
runs' ``metrics.json`` and writes ``<out>/latency_cli.csv`` and ``.md``: per method and backend the
time per output token (p50/p10/p90), TTFT, attended and resident KV, pages and effective KV
exposure. What users get from a run is what it measures (host loop, sampling, prefill included).
The faster backend goes first, so a run cut short by its deadline keeps the triton rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from retrobench.conf import conf_dir

CONF = conf_dir()
# every method of conf/method/ (no list to keep), full attention first as the baseline
METHODS = tuple(sorted((p.stem for p in (CONF / "method").glob("*.yaml")), key=lambda m: (m != "full", m)))
COLUMNS = ("method", "backend", "context", "new_tokens", "tpot_p50_ms", "tpot_p10_ms", "tpot_p90_ms", "ttft_s",
           "attended_kv", "resident_kv", "pages_selected", "exposure", "peak_memory_gb", "device", "git_sha", "run")  # fmt: skip


def run_until(args: list[str], timeout: float, what: str) -> int:
    """``python -m retrobench <args>`` (printed first) within ``timeout`` seconds; 124 when cut there
    (the finished runs and samples of a resumable run are kept)."""
    cmd = [sys.executable, "-m", "retrobench", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    try:
        return subprocess.run(cmd, check=False, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"{what}: stopped at the deadline; what finished is kept", flush=True)
        return 124


def run_backend(backend: str, methods: list[str], context: int, new_tokens: int, results: Path, timeout: float) -> int:
    return run_until(["run", "-m", "experiment=latency", "device=cuda", f"engine.backend={backend}",
                      f"method={','.join(methods)}", f"task.context_tokens={context}",
                      f"task.max_new_tokens={new_tokens}", f"results_dir={results}"], timeout, backend)  # fmt: skip


def collect(results: Path) -> list[dict]:
    rows = []
    for path in sorted((results / "runs").glob("*/metrics.json")):
        info = json.loads(path.read_text())
        env = json.loads((path.parent / "env.json").read_text())
        m = info["metrics"]
        rows.append({
            "method": info["method"], "backend": info["backend"],
            "context": (info.get("task_settings") or {}).get("context_tokens", ""),
            "new_tokens": m.get("new_tokens"), "tpot_p50_ms": 1e3 * m["tpot_p50_s"], "tpot_p10_ms": 1e3 * m["tpot_p10_s"],
            "tpot_p90_ms": 1e3 * m["tpot_p90_s"], "ttft_s": m["ttft_p50_s"], "attended_kv": m.get("attended_kv"),
            "resident_kv": m.get("resident_kv"), "pages_selected": m.get("pages_selected"), "exposure": m.get("exposure"),
            "peak_memory_gb": (m.get("peak_memory_bytes") or 0) / 1e9, "device": env.get("device_name", ""),
            "git_sha": env.get("git_sha", ""), "run": path.parent.name,
        })  # fmt: skip
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else 99, r["backend"]))


def fmt(value, spec: str) -> str:
    return "-" if value is None or value == "" else format(value, spec)


def write(rows: list[dict], out: Path, context: int, asked: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Write latency_cli.csv and .md; returns the ``asked`` (method, backend) pairs with no row, which the
    markdown names too (a run that failed or was cut: the multirun's log says why)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "latency_cli.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    device = rows[0]["device"] if rows else "?"
    sha = rows[0]["git_sha"] if rows else "?"
    lines = [f"# CLI latency, experiment=latency at {context} tokens ({device}, git {sha})", "",
             "Llama-3.1-8B shape, random bf16 weights, batch 1, each method's default settings (budget 15 %, "
             "retro w = 2 over quest, 2 dense layers for the selecting methods). tpot = time per output token over "
             "all decode steps (host loop and sampling included); TTFT includes the prefill.", "",
             "| method | backend | tpot p50 ms | p10 | p90 | TTFT s | attended KV | resident KV | pages | exposure | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['backend']} | {fmt(r['tpot_p50_ms'], '.2f')} | {fmt(r['tpot_p10_ms'], '.2f')} | "
            f"{fmt(r['tpot_p90_ms'], '.2f')} | {fmt(r['ttft_s'], '.2f')} | {fmt(r['attended_kv'], '.1f')} | "
            f"{fmt(r['resident_kv'], '.0f')} | {fmt(r['pages_selected'], '.1f')} | {fmt(r['exposure'], '.3f')} | "
            f"{fmt(r['peak_memory_gb'], '.1f')} |"
        )
    by = {(r["method"], r["backend"]): r for r in rows}
    ratios = [f"- {m}: torch / triton tpot p50 = {by[(m, 'torch')]['tpot_p50_ms'] / by[(m, 'triton')]['tpot_p50_ms']:.1f}x"
              for m in METHODS if (m, "torch") in by and (m, "triton") in by]  # fmt: skip
    if ratios:
        lines += ["", "Backends side by side (same run of this script):", "", *ratios]
    missing = [pair for pair in asked if pair not in by]
    if missing:
        lines += ["", "No row (the run failed or did not finish; the multirun's log says why): "
                  + ", ".join(f"{m} on {b}" for m, b in missing) + "."]  # fmt: skip
    (out / "latency_cli.md").write_text("\n".join(lines) + "\n")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrobench.bench_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench", help="folder for latency_cli.csv and .md")
    parser.add_argument("--results-dir", default="results/latency_cli", help="the run store of these runs")
    parser.add_argument("--context", type=int, default=32768, help="prompt tokens (task.context_tokens)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per run (task.max_new_tokens)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--backends", default="triton,torch", help="in order; the first gets the time first")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="stop starting backends after this")
    args = parser.parse_args(argv)
    start, results = time.perf_counter(), Path(args.results_dir)
    methods = [m for m in args.methods.split(",") if m]
    asked = []
    for backend in [b for b in args.backends.split(",") if b]:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < 30:
            print(f"deadline: {backend} not run", flush=True)
            continue
        asked += [(m, backend) for m in methods]
        run_backend(backend, methods, args.context, args.new_tokens, results, left)
    rows = collect(results)
    missing = write(rows, Path(args.out), args.context, asked)
    print((Path(args.out) / "latency_cli.md").read_text())
    return 0 if rows and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
