"""The written report (:func:`write_report`, what ``python -m retrobench report`` calls) and the
per-run figures logged to wandb (:func:`run_figures`, :func:`log_run_to_wandb`).

The report's sections live in :mod:`retrobench.report.sections`; this module sets up the output
folder, reads the store once, writes the header and calls the sections in order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from retrobench.store import results
from retrobench.store.tables import load_runs, load_samples, read_rows
from retrobench.report import sections, sections_latency
from retrobench.report.load import read_bench
from retrobench.report.markdown import Writer
from retrobench.report.sections import generating
from retrobench.report.stats import select


def write_report(
    results_dir: str | Path = "results",
    out_dir: str | Path | None = None,
    bench_dir: str | Path | None = None,
) -> Path:
    """Write ``report.md``, ``tables/*.csv`` and ``plots/*.png`` under ``out_dir``; returns report.md.

    ``out_dir`` defaults to ``<results_dir>/report``; ``bench_dir`` to ``<results_dir>/bench``.
    Previous ``tables/*.csv`` and ``plots/*.png`` there are removed first, so the folder always
    matches the store.
    """
    # imported before the out folder is touched, so a missing plotting dependency changes nothing there
    from retrobench.report import plots  # noqa: F401
    from retrobench.report.paper_numbers import PAPER_NUMBERS, exposure_points  # noqa: F401

    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    bench = read_bench(Path(bench_dir) if bench_dir is not None else results_dir / "bench")
    for sub in ("tables", "plots"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(results_dir)
    samples = load_samples(results_dir)
    w = Writer(out)
    w.text(
        "# retrobench report",
        f"Store: `{results_dir}` — {len(runs)} finished runs, {len(samples)} samples"
        + (f", {len(bench)} benchmark CSVs" if bench else "")
        + ". Written by `python -m retrobench report` from the stored files only.",
        "Cells are `mean [95% CI]`: percentile bootstrap of the mean (2000 resamples, seed 0) over "
        "samples (seeds pooled) unless stated; accuracy-like metrics in %. Method comparisons are "
        "paired on the same samples (`id`, `seed`); differences of % metrics are in percentage "
        "points (pp). Labels name a method and the settings that distinguish its runs.",
    )

    sections.runs_overview(w, runs, samples)
    gen = generating(samples)
    lgb = select(gen, {"task": "longgenbench"})
    sections.longgenbench(w, lgb)
    sections.paper_comparison(w, runs, samples, bench)
    sections.window_ablation(w, gen)
    sections.budget_sweep(w, gen)
    sections.exposure(w, samples, gen)
    sections.fidelity(w, samples)
    sections.perplexity(w, samples)
    sections_latency.latency_runs(w, runs)
    sections_latency.benchmarks(w, bench)

    path = out / "report.md"
    path.write_text("\n".join(w.lines).rstrip() + "\n")
    return path


def run_figures(folder: str | Path) -> dict[str, Any]:
    """Figures of one run folder (for wandb): decode step time by position, and for a ppl run the
    perplexity ratio by position. Empty when the folder has no samples."""
    import pandas as pd

    from retrobench.report import plots

    folder = Path(folder)
    rows = read_rows(folder / results.SAMPLES_FILE)
    figures: dict[str, Any] = {}
    steps = [
        {"sample": r.get("id"), "step": i + 1, "ms": 1000.0 * float(t)}
        for r in rows
        for i, t in enumerate(r.get("step_times_s") or [])
    ]
    if steps:
        figures["decode_time_over_position"] = plots.decode_time_over_position(pd.DataFrame(steps))
    scores = pd.DataFrame(
        [{k: v for k, v in (r.get("score") or {}).items() if isinstance(v, (int, float))} for r in rows]
    )
    if plots.bucket_columns(scores):
        scores["label"] = folder.name
        figures["ppl_ratio_over_position"] = plots.ppl_ratio_over_position(scores)
    return figures


def log_run_to_wandb(wandb_run: Any, folder: str | Path) -> list[str]:
    """Log the run's figures (:func:`run_figures`) as images to an open wandb run; returns their names.

    The config is logged by ``wandb.init`` and the metrics by the run's summary (see
    :mod:`retrobench.runner.run`); this adds the plots.
    """
    import io

    import wandb
    from PIL import Image

    figures = run_figures(folder)
    images = {}
    for name, fig in figures.items():  # rendered here: wandb's own figure path needs pyplot
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        buffer.seek(0)
        images[f"plots/{name}"] = wandb.Image(Image.open(buffer), caption=name)
    if images:
        wandb_run.log(images)
    return sorted(figures)
