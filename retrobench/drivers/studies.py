"""Teacher-forced studies on a real model that the method issues ask to report.

``python -m retrobench.studies mass``  — share of the dense attention mass each method's selection
captures (mass recall, averaged over sparse layers and steps) and the attention-output error, for
every selecting/evicting method at several budgets, along a natural text.

``python -m retrobench.studies table --store DIR`` — one table of the ppl / fidelity runs in a
result store (mean and CI per task, method and budget, wall times, retro - quest paired).

``python -m retrobench.studies retro`` — RetroAttention against Quest along the full-attention
greedy output: effective KV exposure for each window, top-1 agreement with full attention and
mean KL(full || method) of the next-token distributions.

Both use the offline standard-library text (``retrobench.inputs.texts``) as the prompt, write a CSV and a
markdown table under ``--out`` (default ``results/reference``) with the model, device, versions
and git sha, and print the table. They are measurements, never tests.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retrobench.engine import Engine
from retrobench.store.metrics import agreement
from retrobench.inputs.models import load_model
from retrobench.store.results import environment
from retrobench.inputs.texts import provenance, stdlib_tokens
from retrobench.conf import conf_dir

CONF = conf_dir()


def make_method(name: str, fraction: float, **extra: Any):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    if "budget" in cfg:
        cfg.budget = {"fraction": fraction, "tokens": None}
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate(cfg, _convert_="all")


def write_table(out: Path, stem: str, rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    if not rows:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _header(args: argparse.Namespace, what: str) -> str:
    env = environment(backend="torch", device="cpu")
    return (
        f"# {what}\n\nModel `{args.model}` (fp32, CPU `{env['device_name']}`, torch {env['torch']}, "
        f"transformers {env['transformers']}), git `{env['git_sha']}`; prompt: first {args.prompt} tokens of "
        f"{provenance()}; engine page size 16; budgets are fractions of the current context."
    )


def study_mass(args: argparse.Namespace) -> None:
    model, tok = load_model(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"), device="cpu", dtype="float32")
    ids = stdlib_tokens(tok, args.prompt + args.steps)
    prompt, forced = ids[: args.prompt], ids[args.prompt :]
    rows = []
    for fraction in args.budgets:
        for name in args.methods:
            method = make_method(name, fraction, **args.set)
            t0 = time.perf_counter()
            gen = Engine(model, method, probe_every=1).generate(prompt, 0, teacher_tokens=forced)
            rows.append({
                "method": name + "".join(f" {k}={v}" for k, v in args.set.items()), "budget_fraction": fraction, "mass_recall": gen.stats["mass_recall"],
                "attn_out_rel_err": gen.stats["attn_out_rel_err"], "attended_kv": gen.stats["attended_kv"],
                "resident_kv": gen.stats["resident_kv"], "steps": len(gen.probes),
                "wall_s": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            print(rows[-1], flush=True)
    cols = ["method", "budget_fraction", "mass_recall", "attn_out_rel_err", "attended_kv", "resident_kv", "wall_s"]
    title = _header(args, f"Dense attention mass captured by each method ({args.steps} teacher-forced tokens)")
    write_table(Path(args.out), "mass_recall", rows, cols, title)


def study_retro(args: argparse.Namespace) -> None:
    model, tok = load_model(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"), device="cpu", dtype="float32")
    prompt = stdlib_tokens(tok, args.prompt)
    t0 = time.perf_counter()
    cached = Path(args.reference) if args.reference else None
    if cached is not None and cached.exists():
        ref_tokens, ref_logits = torch.load(cached)
    else:
        reference = Engine(model, make_method("full", 1.0)).generate(prompt, args.steps, keep_logits=True)
        ref_tokens, ref_logits = reference.tokens, reference.logits
        if cached is not None:
            torch.save((ref_tokens, ref_logits), cached)
    print(f"full greedy: {len(ref_tokens)} tokens in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for fraction in args.budgets:
        runs = [("quest", 1, make_method("quest", fraction))] if args.quest else []
        label = "".join(f" {k}={v}" for k, v in args.set.items())
        runs += [(f"retro w={w}{label}", w, make_method("retro", fraction, window=w, **args.set)) for w in args.windows]
        for label, window, method in runs:
            t0 = time.perf_counter()
            gen = Engine(model, method).generate(prompt, 0, teacher_tokens=ref_tokens, keep_logits=True)
            top1, kl = agreement(ref_logits, gen.logits)
            rows.append({
                "method": label, "window": window, "budget_fraction": fraction, "exposure": gen.stats["exposure"],
                "top1_agreement": top1, "kl_full_method": kl, "attended_kv": gen.stats["attended_kv"],
                "supplement_kv": gen.stats.get("supplement_kv", 0.0), "wall_s": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            print(rows[-1], flush=True)
    cols = ["method", "budget_fraction", "exposure", "top1_agreement", "kl_full_method", "attended_kv",
            "supplement_kv", "wall_s"]  # fmt: skip
    title = _header(args, f"RetroAttention vs Quest along the full-attention greedy output ({args.steps} tokens)")
    write_table(Path(args.out), "retro_exposure_fidelity", rows, cols, title)


#: Per task: the metrics of the one-table summary (``python -m retrobench.studies table``).
TABLE_METRICS = {"ppl": ("ppl_ratio", "nll"), "fidelity": ("top1_agreement", "kl_full_method", "mass_recall")}


def _machine(folder: Path) -> str:
    """``host, N cores, Python x.y`` of a run (from its env.json)."""
    import json

    env = json.loads((folder / "env.json").read_text())
    cores = f", {env['cpu_count']} cores" if env.get("cpu_count") else ""
    return f"{env.get('hostname', '?')}{cores}, Python {env.get('python', '?')}"


def study_table(args: argparse.Namespace) -> None:
    """One table over a result store: per task, method and budget the mean [95% CI] over samples
    of each task's metrics, exposure, the runs' wall times and where they ran; plus retro - quest
    paired on the same samples."""
    from retrobench.report import cell, paired, summary
    from retrobench.store import load_runs, load_samples

    samples, runs = load_samples(args.store), load_runs(args.store)
    keys = ["task", "dataset", "label", "budget_fraction"]
    lines = [f"| {' | '.join(keys)} | n | metrics (mean [95% CI]) | exposure | run wall s | machine |",
             "|" + "---|" * (len(keys) + 5)]  # fmt: skip
    for key, group in samples.groupby(keys, dropna=False, sort=True):
        task = key[0]
        cells = []
        for metric in TABLE_METRICS.get(task, ()):
            st = summary(group, metric=metric)
            if len(st):
                r = st.iloc[0]
                cells.append(f"{metric} {cell(r['mean'], r['ci_low'], r['ci_high'], digits=4)}")
        exp = summary(group, metric="exposure")
        exposure = "" if exp.empty else f"{exp.iloc[0]['mean']:.3f}"
        ran = runs[runs["run"].isin(group["run"].unique())]
        walls = ", ".join(f"{w:.0f}" for w in sorted(ran["wall_time_s"]))
        machine = ", ".join(sorted({_machine(Path(args.store) / "runs" / str(r)) for r in ran["run"]}))
        lines.append(f"| {' | '.join('' if v != v else str(v) for v in key)} | {len(group)} | {'; '.join(cells)} | "
                     f"{exposure} | {walls} | {machine} |")  # fmt: skip
    lines += ["", "Paired retro - quest on the same samples (mean [95% CI]; negative ppl_ratio / KL is better):", ""]
    for (task, budget), group in samples.groupby(["task", "budget_fraction"], sort=True):
        for label in sorted(set(group["label"]) - {"quest", "full"}):
            for metric in TABLE_METRICS.get(task, ())[:2]:
                d = paired(group, a={"label": label}, b={"label": "quest"}, metric=metric)
                if len(d) and d.iloc[0]["n"] > 0:
                    r = d.iloc[0]
                    lines.append(f"- {task}, budget {budget}, {label} - quest, {metric}: "
                                 f"{cell(r['mean'], r['ci_low'], r['ci_high'], digits=4)} (n={int(r['n'])})")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    mass = sub.add_parser("mass", help="attention mass captured per method and budget")
    mass.add_argument("--methods", nargs="+", default=["oracle", "quest", "infllm", "streaming", "tova"])
    mass.add_argument("--steps", type=int, default=256)
    retro = sub.add_parser("retro", help="exposure, top-1 agreement and KL of retro vs quest")
    retro.add_argument("--windows", nargs="*", type=int, default=[1, 2, 4, 8])
    retro.add_argument("--steps", type=int, default=512)
    retro.add_argument("--no-quest", dest="quest", action="store_false", help="skip the quest rows")
    retro.add_argument("--reference", default="", help="file caching the full-attention greedy output")
    for p in (mass, retro):
        p.add_argument("--model", default="smollm2_135m")
        p.add_argument("--prompt", type=int, default=4096)
        p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.15])
        p.add_argument("--out", default="results/reference")
        p.add_argument("--set", nargs="*", default=[], help="extra method settings, key=value (YAML values)")
    table = sub.add_parser("table", help="one table of ppl / fidelity runs in a result store, retro - quest paired")
    table.add_argument("--store", default="results", help="results_dir of the runs")
    table.add_argument("--out", default="results/reference")
    table.set_defaults(set=[])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    args.set = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.threads:
        torch.set_num_threads(args.threads)
    {"mass": study_mass, "retro": study_retro, "table": study_table}[args.study](args)


if __name__ == "__main__":
    main()
