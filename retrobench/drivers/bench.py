"""Decode-speed benchmark: retrobench's engine against transformers' own ``generate``, side by side.

``python -m retrobench.bench [--model smollm2_135m] [--prompt 2048] [--new 128] [--method full]``
loads the model once, then alternates the two decoders ``--repeats`` times on the same prompt
(greedy, fixed length) and reports decode tokens/s (time after the first token), TTFT and the
ratio. On CPU the engine's default runs its fused layers uncompiled (one Q/K/V and one gate/up
projection a layer); ``--modules`` times a third decoder, the engine through transformers' own
modules (``fused_layers=False``, the CPU default before 58d449b). Rows go to
``results/bench/engine_vs_generate.csv`` (long format, with device, versions and
git sha) and a markdown table beside it. Measure on an idle machine; never used in tests.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retrobench.engine import Engine
from retrobench.inputs.models import load_model
from retrobench.store.results import environment
from retrobench.conf import conf_dir

CONF = conf_dir()


def _hf_decode(model, ids: list[int], new: int) -> tuple[float, float]:
    """(ttft_s, decode_s) of transformers' greedy generate (dynamic cache, its default attention)."""
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return ttft, total - ttft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--method", default="full")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--modules", action="store_true",
                        help="also time the engine through transformers' modules (fused_layers=False), a third provider")  # fmt: skip
    args = parser.parse_args(argv)

    model, _ = load_model(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"), device="cpu", dtype="float32")
    method = instantiate(OmegaConf.load(CONF / "method" / f"{args.method}.yaml"), _convert_="all")
    engines = {"retrobench": Engine(model, method)}
    if args.modules:
        engines["retrobench (transformers modules)"] = Engine(model, method, fused_layers=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (args.prompt,), generator=gen).tolist()
    for engine in engines.values():  # warm-up every path
        engine.generate(ids[:64], 4)
    _hf_decode(model, ids[:64], 4)
    runs_of: dict[str, list[tuple[float, float, int]]] = {name: [] for name in [*engines, "transformers.generate"]}
    for _ in range(args.repeats):  # the decoders alternate, so a noisy machine hits each alike
        for name, engine in engines.items():
            g = engine.generate(ids, args.new)
            runs_of[name].append((g.ttft_s, sum(g.step_times_s), len(g.step_times_s)))
        ttft, dec = _hf_decode(model, ids, args.new)
        runs_of["transformers.generate"].append((ttft, dec, args.new - 1))
    env = environment(backend=engines["retrobench"].backend, device="cpu")
    rows = []
    for name, runs in runs_of.items():
        tps = [n / d for _, d, n in runs]
        rows.append({
            "op": "decode", "provider": name, "method": args.method, "model": args.model, "prompt": args.prompt,
            "new_tokens": args.new, "tokens_per_s_p50": statistics.median(tps), "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps), "ttft_s_p50": statistics.median(t for t, _, _ in runs),
            "device": env.get("device_name", "cpu"), "torch": env.get("torch"), "transformers": env.get("transformers"),
            "git_sha": env.get("git_sha"), "threads": torch.get_num_threads(),
        })  # fmt: skip
    theirs = rows[-1]["tokens_per_s_p50"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "engine_vs_generate.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Decode speed: retrobench engine vs transformers generate ({args.model}, {args.prompt}-token prompt, "
        f"{args.new} new tokens, {rows[0]['device']}, {torch.get_num_threads()} threads, git {rows[0]['git_sha']})",
        "",
        "| provider | decode tokens/s (p50 of runs) | min | max | TTFT s |",
        "|---|---|---|---|---|",
        *(f"| {r['provider']} | {r['tokens_per_s_p50']:.2f} | {r['tokens_per_s_min']:.2f} | "
          f"{r['tokens_per_s_max']:.2f} | {r['ttft_s_p50']:.2f} |" for r in rows),
        "",
        *(f"ratio {r['provider']} / generate: {r['tokens_per_s_p50'] / theirs:.2f}x" for r in rows[:-1]),
    ]  # fmt: skip
    (out / "engine_vs_generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
