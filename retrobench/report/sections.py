"""The sections of report.md, one writer each, and the helpers they share.

Each ``section(w, ...)`` appends one ``##`` section (text, CSV tables, plots) to a
:class:`~retrobench.report.markdown.Writer`, or "no runs" and why; :func:`retrobench.report.write.write_report`
calls them in order. Kept apart from ``write_report`` so that each section reads on its own; the
latency sections are in :mod:`retrobench.report.sections_latency`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from retrobench.report.common import PERCENT, metric_scale, numeric, short
from retrobench.report.load import runs_latency
from retrobench.report.markdown import Writer, cell, pivot_cells
from retrobench.report.paper import paper_table
from retrobench.report.stats import groups, paired_vs_base, select, summary


def generating(samples: Any) -> Any:
    if samples.empty or "accuracy" not in samples.columns:
        return samples.iloc[0:0]
    return samples[samples["accuracy"].notna()]


def _with_pct(stats: Any, metric: str, digits: int = 1) -> Any:
    """Summary rows with the metric's mean and CI rounded (and in % for percent metrics)."""
    stats = stats.copy()
    scale = metric_scale(metric)
    for col in ("mean", "ci_low", "ci_high"):
        stats[col] = (stats[col] * scale).round(digits if metric in PERCENT else 6)
    if metric in PERCENT:
        stats = stats.rename(columns={"mean": "mean (%)"})
    return stats


def _safe_paired(w: Writer, samples: Any, metric: str, by: Sequence[str]) -> Any:
    """:func:`paired_vs_base`, or (when runs that the labels do not tell apart share samples, e.g. two
    task settings) an empty frame and a line in the report saying why."""
    try:
        return paired_vs_base(samples, metric, by)
    except ValueError as exc:
        w.text(f"not paired ({metric}): {exc}")
        return samples.iloc[0:0]


def _broadcast_unbudgeted(stats: Any, rows: Sequence[str]) -> Any:
    """Summary rows of methods without a budget (full) copied onto every budget of the same group."""
    import pandas as pd

    budget = ["budget_fraction", "budget_tokens"]
    if stats.empty or not set(budget) <= set(stats.columns):
        return stats
    free = stats["budget_fraction"].isna() & stats["budget_tokens"].isna()
    others = [c for c in rows if c not in budget]
    budgets = stats.loc[~free, [*others, *budget]].drop_duplicates()
    if budgets.empty or not free.any():
        return stats
    copies = stats[free].drop(columns=budget).merge(budgets, on=others, how="inner")
    kept = stats[free].merge(budgets[others].drop_duplicates(), on=others, how="left", indicator=True)
    alone = kept[kept["_merge"] == "left_only"].drop(columns="_merge")  # no budgeted run beside them
    return pd.concat([stats[~free], copies[stats.columns], alone[stats.columns]], ignore_index=True)


def _scaled_diff(diff: Any, metric: str) -> Any:
    """Paired rows with mean/std/CI in pp for percent metrics, and a ``unit`` column saying so."""
    diff = diff.copy()
    if metric in PERCENT:
        for col in ("mean", "std", "ci_low", "ci_high"):
            diff[col] = diff[col] * 100
    diff.insert(diff.columns.get_loc("n"), "unit", "pp" if metric in PERCENT else "")
    return diff


def runs_overview(w: Writer, runs: Any, samples: Any) -> None:
    """``## Runs``: runs (and samples) per task, model, label, dataset and budget."""
    w.text("## Runs")
    if runs.empty:
        w.none("the store has no finished run")
    else:
        keys = ["task", "model", "label", "dataset", "budget_fraction", "budget_tokens"]
        overview = (
            runs.groupby(keys, dropna=False)
            .agg(runs=("run", "count"), seeds=("seed", lambda s: ",".join(short(x) for x in sorted(set(s)))))
            .reset_index()
        )
        if not samples.empty:
            counts = samples.groupby(keys, dropna=False).size().rename("samples").reset_index()
            overview = overview.merge(counts, on=keys, how="left")
        w.table("runs_overview", overview)


def longgenbench(w: Writer, lgb: Any) -> None:
    """``## LongGenBench accuracy``: accuracy by method, pooled over n, completion, and retro − base."""
    from retrobench.report import plots

    w.text("## LongGenBench accuracy")
    if lgb.empty:
        w.none("task=longgenbench")
    else:
        rows = ["model", "dataset", "num_questions", "budget_fraction", "budget_tokens"]
        stats = summary(lgb, [*rows, "label"], "accuracy")
        w.text(
            "Accuracy (%) per prompt of n questions, by method (samples per cell: column `n` of the CSV; "
            "methods without a budget, i.e. full, are repeated on every budget row):"
        )
        w.table(
            "longgenbench_accuracy",
            stats,
            pivot_cells(_broadcast_unbudgeted(stats, rows), rows, "label", "accuracy"),
        )
        if lgb["num_questions"].nunique() > 1:
            rows = ["model", "dataset", "budget_fraction", "budget_tokens"]
            pooled = summary(lgb, [*rows, "label"], "accuracy")
            w.text("Pooled over every n present (the paper's table averages n = 15/30/45):")
            w.table(
                "longgenbench_accuracy_pooled",
                pooled,
                pivot_cells(_broadcast_unbudgeted(pooled, rows), rows, "label", "accuracy"),
            )
        if "completion" in lgb.columns and lgb["completion"].notna().any():
            rows = ["model", "dataset", "budget_fraction", "budget_tokens"]
            done = summary(lgb, [*rows, "label"], "completion")
            w.text(
                "Completion (%): share of the n questions whose `Answer_<k>` the scorer found, pooled "
                "over n (an answer never written counts as wrong above):"
            )
            w.table(
                "longgenbench_completion",
                done,
                pivot_cells(_broadcast_unbudgeted(done, rows), rows, "label", "completion"),
            )
        diff = _safe_paired(w, lgb, "accuracy", ["model", "dataset", "num_questions"])
        w.text("### Retro − base (paired accuracy difference, pp)")
        if diff.empty:
            w.none("needs retro and its base at the same budget on the same samples")
        else:
            w.table("longgenbench_paired", _scaled_diff(diff, "accuracy"))
            fig = plots.paired_differences(diff, metric="accuracy", by="dataset")
            w.figure("longgenbench_paired", fig, "retro − base accuracy difference")


def paper_comparison(w: Writer, runs: Any, samples: Any, bench: Mapping[str, Any]) -> None:
    """``## Paper numbers beside ours``: :func:`~retrobench.report.paper.paper_table`, shown."""
    from retrobench.report.paper_numbers import PAPER_NUMBERS

    w.text("## Paper numbers beside ours")
    latency_frames = dict(bench)
    if not runs_latency(runs).empty:
        latency_frames["runs"] = runs_latency(runs)
    table = paper_table(samples, latency_frames)
    if (table["n"] > 0).any():
        w.text(
            "Paper numbers from `reference/paper.md` (`retrobench/report/paper_numbers.yaml`, source per row). "
            "`gap` = ours − paper. Rows whose model differs from the paper's (`same_model` = no) are "
            "context, not a reproduction check."
        )
    else:
        w.text("No run matches any of the paper's settings; the paper's numbers are listed for reference.")
    shown = table.copy()
    shown["ours"] = [
        ("no runs" if note == "no runs" else "—")
        if n == 0
        else f"{o:.4g}" + ("" if math.isnan(lo) else f" [{lo:.4g}, {hi:.4g}]")
        for o, lo, hi, n, note in zip(
            shown["ours"], shown["ci_low"], shown["ci_high"], shown["n"], shown["note"]
        )
    ]
    shown["paper"] = [f"{b}{v:g}" if b != "=" else f"{v:g}" for b, v in zip(shown["bound"], shown["paper"])]
    w.table(
        "paper_comparison",
        table,
        shown[
            [
                "quantity",
                "unit",
                "paper",
                "paper_model",
                "model",
                "label",
                "ours",
                "n",
                "gap",
                "same_model",
                "note",
            ]
        ],
    )
    unmatched = [n for n in PAPER_NUMBERS if n.kind == "unmatched"]
    if unmatched:
        w.text(
            "Not compared (model and setting unknown): "
            + "; ".join(f"{n.quantity} = {n.value:g}" for n in unmatched)
            + f" — {unmatched[0].source}."
        )


def window_ablation(w: Writer, gen: Any) -> None:
    """``## Window ablation``: accuracy vs retro's window (w = 1 is the base)."""
    from retrobench.report import plots

    w.text("## Window ablation (accuracy vs w)")
    windows = plots.window_frame(gen)
    group = ["model", "task", "dataset", "num_questions", "budget_fraction", "budget_tokens", "series"]
    if windows.empty or not (windows.groupby(group, dropna=False)["window"].nunique() > 1).any():
        w.none("needs retro at two or more windows, or retro beside its base (w = 1)")
    else:
        stats = summary(windows, group + ["window"], "accuracy")
        w.text("Accuracy (%) by retrospective window; w = 1 is the base method's own runs (retro at w = 1 "
               "is exactly its base). `series` is the retro variant.")  # fmt: skip
        w.table(
            "window_ablation", _with_pct(stats, "accuracy"), pivot_cells(stats, group, "window", "accuracy")
        )
        w.figure("accuracy_vs_window", plots.accuracy_vs_window(gen, facet="dataset"), "accuracy vs window")


def budget_sweep(w: Writer, gen: Any) -> None:
    """``## Budget sweep``: accuracy vs budget fraction for methods run at two or more."""
    from retrobench.report import plots

    w.text("## Budget sweep (accuracy vs budget)")
    group = ["model", "task", "dataset", "num_questions", "label"]
    swept = gen[gen["budget_fraction"].notna()] if not gen.empty else gen
    if not swept.empty:
        count = swept.groupby(group, dropna=False)["budget_fraction"].transform("nunique")
        swept = swept[count > 1]
    if swept.empty:
        w.none("needs one method at two or more budget fractions")
    else:
        stats = summary(swept, group + ["budget_fraction"], "accuracy")
        w.table(
            "budget_sweep",
            _with_pct(stats, "accuracy"),
            pivot_cells(stats, group[:-1] + ["label"], "budget_fraction", "accuracy"),
        )
        w.figure("accuracy_vs_budget", plots.accuracy_vs_budget(swept, facet="dataset"), "accuracy vs budget")


def exposure(w: Writer, samples: Any, gen: Any) -> None:
    """``## Effective KV exposure`` of retro runs, beside the paper's points."""
    from retrobench.report import plots
    from retrobench.report.paper_numbers import exposure_points

    w.text("## Effective KV exposure")
    retro = select(samples, {"method": "retro"})
    if retro.empty or "exposure" not in retro.columns or retro["exposure"].notna().sum() == 0:
        w.none("method=retro")
    else:
        stats = summary(
            retro, ["model", "task", "budget_fraction", "budget_tokens", "base", "window"], "exposure"
        )
        points = exposure_points()
        stats["paper"] = [points.get(int(x)) if not math.isnan(x) else None for x in stats["window"]]
        w.text(
            "Distinct KV tokens each query saw (own selection + retrospective supplements) / own selection; "
            "1 for every other method. Paper (Llama-3.1-8B): ≈1.17 at w=2, ≈1.6 at w=8."
        )
        w.table("exposure", stats)
        w.figure("exposure_vs_window", plots.exposure_vs_window(samples), "exposure vs window")
        if not select(gen, {"method": "retro"}).empty:
            w.figure("exposure_vs_accuracy", plots.exposure_vs_accuracy(gen), "exposure vs accuracy")


def fidelity(w: Writer, samples: Any) -> None:
    """``## Fidelity to full attention`` (task=fidelity) and retro − base."""
    w.text("## Fidelity to full attention (task=fidelity)")
    fid = select(samples, {"task": "fidelity"})
    if fid.empty:
        w.none("task=fidelity")
    else:
        group = ["model", "dataset", "num_questions", "budget_fraction", "budget_tokens", "label"]
        metrics = [m for m in ("top1_agreement", "kl_full_method", "first_divergence", "mass_recall",
                               "attn_out_rel_err") if m in fid.columns]  # fmt: skip
        wide = None
        for metric in metrics:
            stats = summary(fid, group, metric)
            stats[metric] = [
                cell(m, lo, hi, metric) for m, lo, hi in zip(stats["mean"], stats["ci_low"], stats["ci_high"])
            ]
            part = stats[[*group, "n", metric]]
            wide = part if wide is None else wide.merge(part.drop(columns="n"), on=group, how="outer")
        w.text("top1_agreement and mass_recall in %; KL(full‖method) in nats; first_divergence in tokens.")
        w.table("fidelity", wide)
        frames = []
        for metric in ("top1_agreement", "kl_full_method"):
            if metric in fid.columns:
                d = _safe_paired(w, fid, metric, ["model", "dataset", "num_questions"])
                if not d.empty:
                    frames.append(_scaled_diff(d, metric).assign(metric=metric))
        w.text("### Retro − base (paired)")
        if frames:
            import pandas as pd

            w.table("fidelity_paired", pd.concat(frames, ignore_index=True))
        else:
            w.none("needs retro and its base at the same budget on the same samples")


def perplexity(w: Writer, samples: Any) -> None:
    """``## Perplexity over position`` (task=ppl) and retro − base."""
    from retrobench.report import plots

    w.text("## Perplexity over position (task=ppl; paper Figure 1b)")
    ppl = select(samples, {"task": "ppl"})
    buckets = plots.bucket_columns(ppl)
    if ppl.empty or not buckets:
        w.none("task=ppl")
    else:
        group = ["model", "dataset", "budget_fraction", "budget_tokens", "label"]
        rows = []
        for key, g in groups(ppl, group):
            row = dict(zip(group, key))
            s = summary(g, [], "ppl_ratio")
            row["ppl_ratio"] = (
                cell(s["mean"].iloc[0], s["ci_low"].iloc[0], s["ci_high"].iloc[0]) if len(s) else ""
            )
            row["n"] = int(s["n"].iloc[0]) if len(s) else 0
            for i, col in buckets:
                row[f"bucket {i}"] = round(float(numeric(g[col]).mean()), 4)
            rows.append(row)
        import pandas as pd

        w.text(
            "Perplexity ratio to full attention: overall [CI], and the mean per generated-position bucket."
        )
        w.table("ppl_ratio", pd.DataFrame(rows))
        w.figure(
            "ppl_ratio_over_position", plots.ppl_ratio_over_position(ppl), "perplexity ratio by position"
        )
        d = (
            _safe_paired(w, ppl, "ppl_ratio", ["model", "dataset"])
            if "ppl_ratio" in ppl.columns
            else ppl.iloc[0:0]
        )
        w.text("### Retro − base (paired ppl ratio; negative is better)")
        if d.empty:
            w.none("needs retro and its base at the same budget on the same windows")
        else:
            w.table("ppl_paired", d)
