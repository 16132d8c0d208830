"""Decode-step latency of ``engine.backend=triton`` against its memory-traffic floor.

``python -m retrobench.bench_decode`` (``make bench`` on a GPU machine) measures, on a
Llama-3.1-8B-shaped model with random bf16 weights (latency does not depend on weight values):

1. the device's copy bandwidth (a large device-to-device copy; read + write bytes / time) and
   the sparse paged attention kernel's achieved bandwidth (K/V bytes read / time);
2. the time of one whole decode step through ``Engine.forward`` (host plan, one copy of the step's
   buffers, CUDA-graph replay of all layers) for full, quest and retro (w = 2, 4, 8) at each
   context, budget and batch size that fits in memory, beside its floor: (weights read + page
   metadata read + selected K/V read) / copy bandwidth; and for every other method (oracle,
   infllm, streaming, tova, retro over infllm / oracle) at 32K, batch 1, without a floor;
3. derived ratios: retro / quest at equal budget and quest, retro vs full.

The KV cache is filled with random keys and values (exact page min/max; method state set by
``Method.prefilled``) instead of running a prefill: a decode step's cost depends on the context
length and the budget, not on the values.
Rows are appended to ``<out>/decode.csv`` as they are measured (long format: op, method, context,
budget, window, batch, p50/p10/p90 ms, bytes, GB/s, floor, device, versions, git sha), so an
interrupted run keeps what it measured; ``<out>/decode.md`` holds the table. On CPU (tests) it
runs eagerly under ``TRITON_INTERPRET=1`` at toy sizes: ``--smoke``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from retrobench.engine import Engine
from retrobench.methods.base import Method, ModelSpec
from retrobench.methods.full import FullMethod
from retrobench.methods.quest import QuestMethod
from retrobench.methods.retro import RetroMethod
from retrobench.store.results import environment
from retrobench.conf import conf_dir

CONF = conf_dir()
FIELDS = ("op", "method", "context", "budget", "window", "batch", "p50_ms", "p10_ms", "p90_ms", "bytes", "gbps",
          "floor_ms", "x_floor", "graph", "compiled", "peak_memory_bytes", "output_cache_bytes", "device", "torch", "triton",
          "transformers", "git_sha")  # fmt: skip


def load_random_model(name: str, device: str, dtype: torch.dtype, overrides: dict[str, Any] | None = None):
    """A Llama from ``conf/model/<name>.yaml``'s config with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    config = LlamaConfig(**{**cfg["config"], **(overrides or {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def fill_cache(engine: Engine, request: Any, filled: int) -> None:
    """Random K/V for positions [0, filled) of every sequence, exact page min/max, method state to match."""
    cache = request.cache
    P, n = cache.page_size, math.ceil(filled / cache.page_size)
    g = torch.Generator(device=cache.k.device).manual_seed(0)
    every = torch.arange(n * P, device=cache.k.device).expand(cache.batch_size, -1)
    positions = torch.where(every < filled, every, torch.full_like(every, -1))
    lengths = torch.full((cache.batch_size,), filled, device=cache.k.device)
    for layer in range(cache.num_layers):
        for b in range(cache.batch_size):
            phys = cache.page_table[b, :n].long()
            shape = (n, P, cache.num_kv_heads, cache.head_dim)
            cache.k[layer, phys] = torch.randn(shape, generator=g, device=cache.k.device).to(cache.k.dtype)
            cache.v[layer, phys] = torch.randn(shape, generator=g, device=cache.k.device).to(cache.v.dtype)
        if cache.kmin is not None:
            engine.ops.update_page_minmax(cache.k[layer], cache.kmin[layer], cache.kmax[layer], cache.page_table,
                                          positions, lengths)  # fmt: skip
    engine.method.prefilled(request.state, [filled] * cache.batch_size)


def make_method(name: str, budget: dict[str, Any] | None, window: int, dense_layers: int) -> Method:
    """A method by name with the bench's budget (the other methods' own defaults otherwise)."""
    if name == "full":
        return FullMethod()
    if name == "quest":
        return QuestMethod(budget=budget, dense_layers=dense_layers)
    if name.startswith("retro"):
        base = name.split(":")[1] if ":" in name else "quest"
        return RetroMethod(base=base, window=window, budget=budget, dense_layers=dense_layers)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    if budget is not None and "budget" in cfg:
        cfg.budget = {"tokens": budget.get("tokens"), "fraction": budget.get("fraction")}
    return instantiate(cfg, _convert_="all")


def time_cuda(fn, iters: int, warmup: int) -> list[float]:
    """Per-call milliseconds of ``fn`` from CUDA events (one pair per call)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cpu(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"p50_ms": statistics.median(ms), "p10_ms": qs[0], "p90_ms": qs[-1]}


def copy_bandwidth(device: str, nbytes: int, timer) -> float:
    """Device copy bandwidth in GB/s, counting the bytes read and written."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = statistics.median(timer(lambda: y.copy_(x), 20, 3))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def step_bytes(model: Any, spec: ModelSpec, method: Method, cache: Any, context: int, batch: int) -> int | None:
    """Bytes a decode step must read at least: weights (embedding rows aside), page metadata, selected
    K/V; None for methods without such a floor here (oracle, infllm, streaming, tova)."""
    if method.name not in ("full", "quest", "retro") or getattr(method, "base", "quest") != "quest":
        return None
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_token = 2 * spec.num_kv_heads * spec.head_dim * cache.k.element_size()  # K + V, one layer
    pages = math.ceil(context / spec.page_size)
    dense = spec.num_layers if method.name == "full" else method.dense_layers
    total = weights + batch * dense * context * kv_token
    if method.name != "full":
        k_pages = min(pages, method.budget.num_pages(context, spec.page_size, method.min_pages))
        meta = 2 * spec.num_kv_heads * spec.head_dim * cache.kmin.element_size() * pages
        total += batch * (spec.num_layers - dense) * (meta + min(context, k_pages * spec.page_size) * kv_token)
    return total


def bench_config(
    model, method: Method, context: int, batch: int, graphs: bool, timer, iters: int, device, compiled: bool = False
) -> dict:
    """Time ``Engine.forward`` of one decode step (S = the method's window) ending at ``context``
    (``compiled``: ``engine.compile``, the fused layers through torch.compile)."""
    engine = Engine(model, method, page_size=16, backend="triton", cuda_graphs=graphs, compile=compiled)
    S = method.reprocess_window
    request = engine.new_request(context, batch)
    fill_cache(engine, request, context - 1)
    positions = torch.arange(context - S, context).expand(batch, S).contiguous()
    ids = torch.randint(0, 256, (batch, S), device=device)
    step = S + 8
    ms = timer(lambda: engine.forward(request, ids, positions, "decode", step), iters, 3)
    state = request.state
    out_cache = getattr(state, "cache_bytes", 0) * batch
    return {**percentiles(ms), "bytes": step_bytes(model, engine.spec, method, request.cache, context, batch),
            "output_cache_bytes": out_cache}  # fmt: skip


def grid(smoke: bool, quick: bool = False) -> list[tuple[int, int, str, dict | None, int]]:
    """(context, batch, method, budget, window) in priority order (an interrupted run keeps the first).

    ``quick``: the issue's target cells only (full, quest and retro w = 2 and 8 at 2048 tokens)."""
    if smoke:
        return [(96, 2, "full", None, 1), (96, 2, "quest", {"tokens": 32}, 1), (96, 2, "retro", {"tokens": 32}, 2),
                (96, 2, "tova", {"tokens": 32}, 1)]  # fmt: skip
    rows = []
    for context, batch in ((32768, 1), (32768, 8), (8192, 1), (8192, 8), (131072, 1)):
        rows.append((context, batch, "full", None, 1))
        for budget in ({"tokens": 2048},) if quick else ({"tokens": 2048}, {"fraction": 0.15}):
            rows.append((context, batch, "quest", budget, 1))
            for w in ((2, 8) if quick else (2, 4, 8)) if "tokens" in budget else (2,):
                rows.append((context, batch, "retro", budget, w))
        if (context, batch) == (32768, 1) and not quick:  # every other method once, at the paper's main setting
            for name in ("oracle", "infllm", "streaming", "tova", "retro:infllm", "retro:oracle"):
                rows.append((context, batch, name, {"fraction": 0.15}, 2 if name.startswith("retro") else 1))
    return rows


def describe(budget: dict | None) -> str:
    return "-" if budget is None else (f"{budget['tokens']}" if "tokens" in budget else f"{budget['fraction']:.0%}")


def write_markdown(rows: list[dict], path: Path, header: str) -> None:
    lines = [header, "", "| method | w | context | batch | budget | compiled | p50 ms | p10 | p90 | floor ms | x floor | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["op"] != "decode_step":
            continue
        floor = (f"{r['floor_ms']:.3f} | {r['x_floor']:.2f} | {r['gbps']:.0f}" if r["floor_ms"] != "" else "- | - | -")
        lines.append(
            f"| {r['method']} | {r['window']} | {r['context']} | {r['batch']} | {r['budget']} | {r['compiled']} | "
            f"{r['p50_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {floor} |"
        )
    lines += ["", "Ratios of p50 step times measured in this run (same context, batch, budget and compile setting):", ""]
    steps = {(r["method"], r["window"], r["context"], r["batch"], r["budget"], r["compiled"]): r["p50_ms"]
             for r in rows if r["op"] == "decode_step"}  # fmt: skip
    for (m, w, ctx, batch, budget, comp), ms in steps.items():
        if m != "retro":
            continue
        quest = steps.get(("quest", 1, ctx, batch, budget, comp))
        full = steps.get(("full", 1, ctx, batch, "-", comp))
        parts = [f"retro/quest {ms / quest:.3f}" if quest else "", f"full/retro {full / ms:.2f}x" if full else "",
                 f"full/quest {full / quest:.2f}x" if full and quest and w == 2 else ""]  # fmt: skip
        lines.append(f"- retro w={w}, context {ctx}, batch {batch}, budget {budget}, compiled {comp}: "
                     + ", ".join(p for p in parts if p))  # fmt: skip
    gains = [(key, ms, steps[(*key[:5], False)]) for key, ms in steps.items() if key[5] is True and (*key[:5], False) in steps]
    if gains:
        lines += ["", "engine.compile (fused layers, torch.compile) against the transformers modules, same run:", ""]
        lines += [f"- {m} w={w}, context {ctx}, batch {batch}, budget {budget}: {off:.3f} -> {on:.3f} ms ({off / on:.2f}x)"
                  for (m, w, ctx, batch, budget, _), on, off in gains]  # fmt: skip
    lines += ["", "Other measurements:", ""]
    for r in rows:
        if r["op"] != "decode_step":
            bw = f"{r['gbps']:.0f} GB/s, " if r["gbps"] != "" else ""
            lines.append(f"- {r['op']}: {bw}{r['method']}, context {r['context']}, batch {r['batch']}, "
                         f"p50 {r['p50_ms']:.3f} ms")  # fmt: skip
    hf = {(r["op"], r["context"]): r["p50_ms"] for r in rows if r["method"] == "transformers"}
    for r in rows:
        if r["op"] == "prefill" and ("hf_prefill", r["context"]) in hf:
            lines.append(f"- TTFT {r['method']} / transformers eager prefill, context {r['context']}: "
                         f"{r['p50_ms'] / hf[('hf_prefill', r['context'])]:.2f}")  # fmt: skip
        if r["op"] == "decode_step" and r["batch"] == 1 and ("hf_static_decode", r["context"]) in hf:
            lines.append(f"- transformers static-cache step / {r['method']} w={r['window']} step (compiled "
                         f"{r['compiled']}), context {r['context']}: {hf[('hf_static_decode', r['context'])] / r['p50_ms']:.2f}x")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrobench.bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench", help="folder for decode.csv and decode.md")
    parser.add_argument("--model", default="llama31_8b_random", help="a model.source=random config of conf/model/")
    parser.add_argument("--iters", type=int, default=30, help="timed decode steps per configuration")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="stop starting new configurations after this")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1), no CUDA graphs")
    parser.add_argument("--compile", choices=("on", "off", "both"), default=None,
                        help="engine.compile for the decode steps: on (what engine.compile=auto picks on a GPU; the "
                             "default there), off (the default with --smoke), or both side by side")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="only the target cells: full, quest, retro w=2/8, 2048 tokens")
    parser.add_argument("--parts", default="decode,prefill",
                        help="comma list: decode (the decode-step grid), prefill (the engine's prefill and transformers' "
                             "eager prefill and static-cache decode at 8K and 32K, batch 1)")  # fmt: skip
    args = parser.parse_args(argv)
    compiles = {"on": (True,), "off": (False,), "both": (True, False)}[args.compile or ("off" if args.smoke else "on")]
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    timer = time_cuda if cuda else time_cpu
    overrides = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "vocab_size": 260} if args.smoke else None  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    model = load_random_model(args.model, device, dtype, overrides)
    c = model.config
    spec = ModelSpec(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                     c.hidden_size // c.num_attention_heads, 16)  # fmt: skip
    if not cuda and not args.smoke:
        print("bench_decode times the triton backend on a CUDA GPU; on CPU run --smoke (TRITON_INTERPRET=1)")
        return 2
    env = environment("triton", device)
    base = {"device": env["device_name"], "torch": env["torch"], "triton": env["triton"] or "",
            "transformers": env["transformers"], "git_sha": env["git_sha"] or ""}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / ("decode_smoke.csv" if args.smoke else "decode.csv")
    rows: list[dict] = []
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()

        def emit(row: dict) -> None:
            row = {**{k: "" for k in FIELDS}, **base, **row}
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            gbps = f"{row['gbps']:.0f} GB/s" if row["gbps"] != "" else ""
            print(f"{row['op']:>12} {row['method']:>12} w={row['window']} ctx={row['context']} B={row['batch']} "
                  f"budget={row['budget']}: p50 {row['p50_ms']:.3f} ms  {gbps}", flush=True)  # fmt: skip

        bw = copy_bandwidth(device, (1 << 20) if args.smoke else (4 << 30), timer)
        emit({"op": "copy", "method": "-", "context": 0, "batch": 1, "budget": "-", "window": 0,
              "p50_ms": 0.0, "p10_ms": 0.0, "p90_ms": 0.0, "gbps": bw})  # fmt: skip
        measured: set[tuple[int, int]] = set()
        parts = set(args.parts.split(","))
        cells = [(*cell, comp) for cell in grid(args.smoke, args.quick) for comp in compiles] if "decode" in parts else []
        for context, batch, name, budget, window, comp in cells:
            if time.perf_counter() - t_start > args.deadline_s:
                print(f"deadline reached: skipping the rest from {name} ctx={context} B={batch}", flush=True)
                break
            if cuda:  # the previous configuration's cache, graphs and their memory pools
                gc.collect()
                torch.cuda.empty_cache()
            need = 2 * spec.num_layers * batch * context * 2 * spec.num_kv_heads * spec.head_dim
            free = torch.cuda.mem_get_info()[0] if cuda else 1 << 62
            if need > 0.8 * free:
                print(f"skip {name} ctx={context} B={batch}: KV needs {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free")
                continue
            if cuda and (context, batch) not in measured:
                measured.add((context, batch))
                kernel_row(emit, spec, context, batch, dtype, timer)
                topk_rows(emit, spec, context, batch, timer)
            method = make_method(name, budget, window, dense_layers=2)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            r = bench_config(model, method, context, batch, cuda, timer, args.iters, device, comp)
            row = {"op": "decode_step", "method": name, "context": context, "batch": batch, "budget": describe(budget),
                   "window": window, **r, "graph": cuda, "compiled": comp,
                   "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else ""}  # fmt: skip
            if r["bytes"] is not None:
                floor_ms = r["bytes"] / (bw * 1e9) * 1e3
                row.update(gbps=r["bytes"] / (r["p50_ms"] * 1e-3) / 1e9, floor_ms=floor_ms, x_floor=r["p50_ms"] / floor_ms)
            else:
                row.update(bytes="", gbps="", floor_ms="", x_floor="")
            emit(row)
        if cuda and "prefill" in parts:
            for context in (8192, 32768):
                if time.perf_counter() - t_start > args.deadline_s:
                    print(f"deadline reached: skipping the prefill and transformers rows at {context}", flush=True)
                    break
                prefill_rows(emit, model, context, timer, compiles[0])
                transformers_rows(emit, model, context, timer)
    header = (f"# Decode-step latency, engine.backend=triton ({base['device']}, {args.model}{' smoke' if args.smoke else ''})"
              f"\n\ntorch {base['torch']}, triton {base['triton']}, git {base['git_sha'] or 'n/a'}; "
              f"floor = bytes / measured copy bandwidth ({bw:.0f} GB/s); CUDA graphs: {cuda}.")  # fmt: skip
    write_markdown(rows, csv_path.with_suffix(".md"), header)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return 0


def kernel_row(emit, spec: ModelSpec, context: int, batch: int, dtype: torch.dtype, timer) -> None:
    """Achieved bandwidth of the attention kernel alone over every page (one layer, S = 1)."""
    from retrobench.kernels.paged_attention import sparse_paged_attention

    P, dev = spec.page_size, "cuda"
    n = math.ceil(context / P)
    k = torch.randn(batch * n, P, spec.num_kv_heads, spec.head_dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.arange(batch * n, dtype=torch.int32, device=dev).view(batch, n)
    pages = torch.arange(n, dtype=torch.int32, device=dev).expand(batch, spec.num_kv_heads, n).contiguous()
    q = torch.randn(batch, spec.num_heads, 1, spec.head_dim, device=dev, dtype=dtype)
    q_pos = torch.full((batch, 1), context - 1, dtype=torch.int32, device=dev)
    ms = timer(lambda: sparse_paged_attention(q, k, v, table, pages, q_pos, spec.head_dim**-0.5), 30, 3)
    kv = batch * context * 2 * spec.num_kv_heads * spec.head_dim * k.element_size()
    emit({"op": "attn_kernel", "method": "full", "context": context, "batch": batch, "budget": "-", "window": 1,
          **percentiles(ms), "bytes": kv, "gbps": kv / (statistics.median(ms) * 1e-3) / 1e9})  # fmt: skip


def topk_rows(emit, spec: ModelSpec, context: int, batch: int, timer, budget_tokens: int = 2048) -> None:
    """One layer's page top-k (Quest's selection at ``budget_tokens``): the selecting kernel, when
    the row fits it, against the packed ``torch.topk`` version, side by side. Timed eagerly, so each
    row includes the host's launch overhead (device time of the kernel alone: ``bench profile``)."""
    from retrobench.kernels import topk

    n = math.ceil(context / spec.page_size)
    k_max = min(n, math.ceil(budget_tokens / spec.page_size))
    scores = torch.randn(batch, spec.num_kv_heads, n, device="cuda")
    k = torch.full((batch,), k_max, device="cuda")
    forced = torch.full((batch,), n - 1, device="cuda")
    impls = {"topk_packed": topk.topk_forced_packed}
    if n <= topk.SELECT_MAX:
        impls["topk_select"] = topk.topk_forced_select
    for op, fn in impls.items():
        ms = timer(lambda fn=fn: fn(scores, k, k_max, forced), 30, 3)
        emit({"op": op, "method": "quest", "context": context, "batch": batch, "budget": f"tokens={budget_tokens}",
              "window": 1, **percentiles(ms)})  # fmt: skip


def prefill_rows(emit, model, context: int, timer, compiled: bool) -> None:
    """Time to first token of the engine's dense chunked prefill (batch 1, ``engine.prefill_chunk=auto``)
    for full, quest and retro w=2, and of full with the CPU default chunk of 512 tokens."""
    ids = torch.randint(0, 1000, (1, context), device="cuda")
    for name, budget, window in (("full", None, 1), ("quest", {"tokens": 2048}, 1), ("retro", {"tokens": 2048}, 2)):
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine(model, make_method(name, budget, window, dense_layers=2), page_size=16, backend="triton",
                        compile=compiled)  # fmt: skip
        ms = timer(lambda: engine.prefill(engine.new_request(context + 16), ids), 3, 1)
        emit({"op": "prefill", "method": name, "context": context, "batch": 1, "budget": describe(budget),
              "window": window, **percentiles(ms), "compiled": compiled})  # fmt: skip
    engine = Engine(model, make_method("full", None, 1, 2), page_size=16, backend="triton", prefill_chunk=512,
                    compile=compiled)  # fmt: skip
    ms = timer(lambda: engine.prefill(engine.new_request(context + 16), ids), 3, 1)
    emit({"op": "prefill_chunk512", "method": "full", "context": context, "batch": 1, "budget": "-", "window": 1,
          **percentiles(ms), "compiled": compiled})  # fmt: skip


def transformers_rows(emit, model, context: int, timer) -> None:
    """transformers on the same model: eager prefill (its default attention; no cache) and the decode step
    of ``generate`` with a static cache (transformers compiles that forward itself), batch 1.

    The step is ``(t(1 + n tokens) - t(1 token)) / n`` over two ``generate`` calls, each after a warm-up."""
    ids = torch.randint(0, 1000, (1, context), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    with torch.inference_mode():
        ms = timer(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 3, 1)
    emit({"op": "hf_prefill", "method": "transformers", "context": context, "batch": 1, "budget": "-", "window": 1,
          **percentiles(ms)})  # fmt: skip
    n = 64

    def generate(new: int) -> None:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                       pad_token_id=0)  # fmt: skip

    try:
        one, many = (timer(lambda k=k: generate(k), 3, 1) for k in (1, 1 + n))
    except Exception as exc:  # noqa: BLE001 - a transformers version without static-cache generate: say so, go on
        print(f"transformers static-cache generate failed at {context}: {type(exc).__name__}: {exc}", flush=True)
        return
    steps = [(b - a) / n for a, b in zip(one, many)]
    emit({"op": "hf_static_decode", "method": "transformers", "context": context, "batch": 1, "budget": "-",
          "window": 1, **percentiles(steps)})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
