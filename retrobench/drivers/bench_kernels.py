"""Launch settings of the decode step's selection and attention kernels, swept and timed on the GPU.

``python -m retrobench bench kernels`` times three ops at the bench model's shape (Llama-3.1-8B: H = 32,
H_kv = 8, D = 128, bf16, page 16) under a grid of launch settings, the ``config`` argument each op
takes: Quest's page scores (pages per program, warps, elementwise or matrix-product bound), the
top-k (warps, where its bisection starts) and the sparse attention at one, two and eight query rows
per sequence (RetroAttention's window at w = 1, 2, 8: warps, pipeline stages, keys per tile, rows
per program, split-K). Each cell is one op at one shape (batch 1 and 8; 8K, 32K and 128K context;
Quest's 2,048-token budget).

Every setting runs on the same inputs as the op's default setting and its output is compared with
the default's (top-k: equal; scores and attention: within bf16 tolerance); a setting whose output
differs is reported as such, not ranked. Timing: ``--launches`` launches captured in one CUDA graph
and replayed ``--replays`` times; microseconds per launch (p50, p10, p90 over replays), so host launch
overhead is excluded, as in the decode step's own graph.

Rows go to ``<out>/kernels.csv`` (long format: op, cell, setting, microseconds, bytes, GB/s, device,
versions, git sha) and ``<out>/kernels.md`` (per cell the settings ranked by p50, the default marked).
``--smoke`` runs toy shapes on CPU under ``TRITON_INTERPRET=1`` with wall-clock timing, to check the
driver itself.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import torch

from retrobench.drivers.bench_decode import percentiles
from retrobench.store.results import environment

FIELDS = ("op", "cell", "setting", "default", "same_output", "p50_us", "p10_us", "p90_us", "bytes", "gbps",
          "device", "torch", "triton", "git_sha")  # fmt: skip


def graph_timer(launches: int, replays: int) -> Callable[[Callable[[], Any]], list[float]]:
    """Microseconds per launch of ``fn``: ``launches`` calls captured in one CUDA graph, replayed."""

    def timer(fn: Callable[[], Any]) -> list[float]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm outside the capture
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 / launches for start, end in events]

    return timer


def wall_timer(fn: Callable[[], Any]) -> list[float]:
    fn()
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


# ---- the three ops: inputs, settings, bytes -------------------------------------------------------------
def scores_cells(smoke: bool, dev: str, dtype: torch.dtype) -> list[dict]:
    from retrobench.kernels import quest

    H, H_kv, D = (8, 2, 32) if smoke else (32, 8, 128)
    shapes = [(2, 40)] if smoke else [(1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048)]
    settings = (grid(dot=[False, True], block_pages=[16, 32], num_warps=[2]) if smoke else
                grid(dot=[False], block_pages=[16, 32], num_warps=[2, 4])
                + grid(dot=[True], block_pages=[16, 32, 64, 128], num_warps=[1, 2, 4, 8]))  # fmt: skip
    cells = []
    for B, n in shapes:
        pool = B * n
        a, b = torch.randn(pool, H_kv, D, device=dev), torch.randn(pool, H_kv, D, device=dev)
        kmin, kmax = torch.minimum(a, b).to(dtype), torch.maximum(a, b).to(dtype)
        table = torch.randperm(pool, device=dev).view(B, n).to(torch.int32)
        args = (torch.randn(B, H, D, device=dev, dtype=dtype), kmin, kmax, table,
                torch.full((B,), n, dtype=torch.int32, device=dev))  # fmt: skip
        cells.append({
            "op": "quest_page_scores", "cell": f"B={B} pages={n}", "settings": settings,
            "default": {"dot": quest.USE_DOT, "block_pages": quest.BLOCK_PAGES, "num_warps": quest.SCORE_WARPS},
            "run": lambda cfg, args=args: quest.quest_page_scores(*args, config=cfg),
            "bytes": 2 * pool * H_kv * D * kmin.element_size(), "tol": 1e-3,
        })  # fmt: skip
    return cells


def topk_cells(smoke: bool, dev: str, dtype: torch.dtype) -> list[dict]:
    from retrobench.kernels import topk

    H_sel = 2 if smoke else 8
    shapes = [(1, 40, 8)] if smoke else [(1, 2048, 128), (8, 2048, 128), (1, 8192, 128)]
    cells = []
    for B, n, k_max in shapes:
        scores = torch.randn(B, H_sel, n, device=dev) * 5 + 10
        k = torch.full((B,), k_max, device=dev)
        forced = torch.full((B,), n - 1, device=dev)
        block_n = max(16, 1 << (n - 1).bit_length())
        cells.append({
            "op": "topk_forced_select", "cell": f"B={B} entries={n} k={k_max}",
            "settings": grid(num_warps=[1, 2] if smoke else [4, 8, 16], row_bounds=[True, False]),
            "default": {"num_warps": topk._select_warps(block_n), "row_bounds": True},
            "run": lambda cfg, a=(scores, k, k_max, forced): topk.topk_forced_select(*a, config=cfg),
            "bytes": B * H_sel * n * 4, "tol": 0.0,
        })  # fmt: skip
    return cells


def attention_cells(smoke: bool, dev: str, dtype: torch.dtype) -> list[dict]:
    from retrobench.kernels import paged_attention as pa

    H, H_kv, D, P = (8, 2, 32, 4) if smoke else (32, 8, 128, 16)
    context, budget = (64, 16) if smoke else (32768, 2048)
    shapes = [(2, 8)] if smoke else [(B, S) for B in (1, 8) for S in (1, 2, 8)]
    base = grid(num_warps=[4], num_stages=[1, 2], block_n=[32]) if smoke else grid(
        num_warps=[4, 8], num_stages=[1, 2, 3], block_n=[32, 64])
    cells = []
    for B, S in shapes:
        n, K = context // P, budget // P
        k_cache = torch.randn(B * n, P, H_kv, D, device=dev, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(B * n, device=dev).view(B, n).to(torch.int32)
        pages = torch.argsort(torch.rand(B, H_kv, n, device=dev), dim=-1)[..., :K].to(torch.int32)
        q = torch.randn(B, H, S, D, device=dev, dtype=dtype)
        q_pos = (context - S + torch.arange(S, device=dev, dtype=torch.int32)).expand(B, S).contiguous()
        extra: dict[str, Any] = {}
        if S > 1:  # RetroAttention's window: a page is new to a past row iff loaded after its step
            extra = {"page_step": torch.randint(0, S + 1, (B, H_kv, n), device=dev, dtype=torch.int32),
                     "q_step": torch.arange(1, S + 1, device=dev, dtype=torch.int32).expand(B, S).contiguous()}  # fmt: skip
        rows = (H // H_kv) * S
        settings = list(base)
        auto = pa.default_num_splits(q, H_kv, K * P, -(-rows // min(max(16, rows), pa.MAX_BLOCK_M)))
        if rows > 16:  # RetroAttention's long windows: short tiles, fewer warps, deeper pipelines, more splits
            settings += grid(max_block_m=[16], num_warps=[4, 8], num_stages=[2], block_n=[64])
            settings += grid(block_n=[16, 32], num_warps=[2, 4], num_stages=[3, 4], num_splits=[auto, 2 * auto, 4 * auto])
        settings += [{"num_splits": n} for n in sorted({max(1, auto // 2), auto - 2, auto - 1, auto + 1, auto * 2}) if n >= 1]
        settings += [{"reduce_rows": r} for r in (1, 2, 4, 8)]
        call = (q, k_cache, v_cache, table, pages, q_pos, D**-0.5)

        def run(cfg, call=call, extra=extra):
            cfg = dict(cfg)
            splits = cfg.pop("num_splits", None)
            return pa.sparse_paged_attention(*call, **extra, num_splits=splits, config=cfg)[0]

        cells.append({
            "op": "sparse_paged_attention", "cell": f"B={B} S={S} keys={budget} ctx={context}", "settings": settings,
            "default": {**pa.launch_settings(rows, -(-K * P // auto)), "num_splits": auto}, "run": run,
            "bytes": B * H_kv * budget * 2 * D * k_cache.element_size(), "tol": 2e-2,
        })  # fmt: skip
    return cells


def same(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if tol == 0:
        return torch.equal(a, b)
    fin = torch.isfinite(b)
    return torch.equal(fin, torch.isfinite(a)) and torch.allclose(a[fin].float(), b[fin].float(), rtol=tol, atol=tol)


def label(cfg: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())


def write_markdown(rows: list[dict], path: Path, header: str) -> None:
    lines = [header]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["op"], r["cell"]), []).append(r)
    for (op, cell), rs in cells.items():
        lines += ["", f"## {op}, {cell}", "", "| setting | p50 us | p10 | p90 | GB/s | vs default |", "|---|---|---|---|---|---|"]
        default = next((r["p50_us"] for r in rs if r["default"]), None)
        for r in sorted(rs, key=lambda r: (not r["same_output"], r["p50_us"])):
            mark = " **(default)**" if r["default"] else ("" if r["same_output"] else " (OUTPUT DIFFERS)")
            ratio = f"{r['p50_us'] / default:.2f}" if default else "-"
            lines.append(f"| {r['setting']}{mark} | {r['p50_us']:.1f} | {r['p10_us']:.1f} | {r['p90_us']:.1f} | "
                         f"{r['gbps']:.0f} | {ratio} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrobench bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench", help="folder for kernels.csv and kernels.md")
    parser.add_argument("--ops", default="scores,topk,attention", help="comma list of: scores, topk, attention")
    parser.add_argument("--cells", default="", help="only cells whose name contains this (e.g. 'B=8 S=8')")
    parser.add_argument("--launches", type=int, default=20, help="launches captured in one CUDA graph")
    parser.add_argument("--replays", type=int, default=20, help="timed replays of the graph")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="stop starting new cells after this")
    parser.add_argument("--smoke", action="store_true", help="toy shapes on CPU (TRITON_INTERPRET=1), wall-clock timing")
    args = parser.parse_args(argv)
    builders = {"scores": scores_cells, "topk": topk_cells, "attention": attention_cells}
    ops = args.ops.split(",")
    bad = [o for o in ops if o not in builders]
    if bad:
        print(f"error: --ops {','.join(bad)}: allowed {', '.join(builders)}")
        return 2
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench kernels times Triton kernels on a CUDA GPU; on CPU run --smoke (TRITON_INTERPRET=1)")
        return 2
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float16)
    timer = graph_timer(args.launches, args.replays) if cuda else wall_timer
    env = environment("triton", dev)
    base = {"device": env["device_name"], "torch": env["torch"], "triton": env["triton"] or "", "git_sha": env["git_sha"] or ""}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / ("kernels_smoke.csv" if args.smoke else "kernels.csv")
    rows: list[dict] = []
    t_start = time.perf_counter()
    torch.manual_seed(0)
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for op in ops:
            for cell in builders[op](args.smoke, dev, dtype):
                if args.cells not in cell["cell"]:
                    continue
                if time.perf_counter() - t_start > args.deadline_s:
                    print(f"deadline reached: skipping {cell['op']} {cell['cell']} and the rest", flush=True)
                    break
                expected = cell["run"](cell["default"])
                settings = [cell["default"]] + [s for s in cell["settings"] if {**cell["default"], **s} != cell["default"]]
                for i, cfg in enumerate(settings):
                    cfg = {**cell["default"], **cfg}
                    ok = same(cell["run"](cfg), expected, cell["tol"])
                    us = timer(lambda cfg=cfg: cell["run"](cfg))
                    p = {k.replace("_ms", "_us"): v for k, v in percentiles(us).items()}
                    row = {**base, "op": cell["op"], "cell": cell["cell"], "setting": label(cfg), "default": i == 0,
                           "same_output": ok, **p, "bytes": cell["bytes"],
                           "gbps": cell["bytes"] / (p["p50_us"] * 1e-6) / 1e9}  # fmt: skip
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    print(f"{row['op']:>22} {row['cell']:<32} {row['setting']:<58} {p['p50_us']:8.1f} us "
                          f"{row['gbps']:6.0f} GB/s{'' if ok else '  OUTPUT DIFFERS'}", flush=True)  # fmt: skip
    header = (f"# Kernel launch settings ({base['device']}{', smoke' if args.smoke else ''})\n\ntorch {base['torch']}, "
              f"triton {base['triton']}, git {base['git_sha'] or 'n/a'}; microseconds per launch "
              f"({'CUDA graph of ' + str(args.launches) + ' launches, ' + str(args.replays) + ' replays' if cuda else 'wall clock'}); "
              f"GB/s = bytes the op must read / p50.")  # fmt: skip
    write_markdown(rows, csv_path.with_suffix(".md"), header)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return 0 if all(r["same_output"] for r in rows) else 1
