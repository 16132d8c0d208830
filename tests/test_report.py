"""The report: tables over a result store with known values, paper gaps, plots, CLI, notebooks, wandb.

:func:`build_store` writes a small store the way ``retrobench.runner.run`` does (real Hydra configs and
run hashes, ``results.append_sample`` / ``results.write_json``, ``metrics.aggregate``) with
synthetic per-sample scores chosen here, so every number the report prints can be checked
against values computed independently from :data:`SPEC`. The committed fixture
``tests/fixtures/results_small/`` (read by the notebooks) is the same store; a test keeps it in
sync (regenerate with ``python tests/test_report.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrobench.store import load_runs, load_samples

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_small"
NOTEBOOKS = ROOT / "notebooks"

#: Correct answers out of n per sample (3 samples per run), per (method label, dataset).
#: n=30 runs (gsm8k: full, quest, retro w=2) use twice these counts; seed 1 adds one to each.
CORRECT = {
    ("full", "gsm8k"): [12, 13, 11],
    ("streaming", "gsm8k"): [0, 0, 1],
    ("tova", "gsm8k"): [1, 0, 2],
    ("quest", "gsm8k"): [8, 9, 7],
    ("retro2", "gsm8k"): [9, 11, 8],
    ("retro4", "gsm8k"): [10, 11, 9],
    ("retro8", "gsm8k"): [11, 12, 10],
    ("full", "csqa"): [11, 12, 12],
    ("streaming", "csqa"): [1, 0, 0],
    ("tova", "csqa"): [1, 1, 2],
    ("quest", "csqa"): [7, 9, 8],
    ("retro2", "csqa"): [9, 9, 10],
}
EXPOSURE = {"retro2": 1.18, "retro4": 1.36, "retro8": 1.61}
#: Budget sweep on gsm8k n=15: correct counts at b=0.05 and b=0.3.
SWEEP = {("quest", 0.05): [3, 4, 2], ("retro2", 0.05): [5, 5, 4], ("quest", 0.3): [11, 11, 10],
         ("retro2", 0.3): [11, 12, 11]}  # fmt: skip
#: ppl: per-bucket perplexity ratios (4 buckets of 32 tokens) for the 2 windows of text.
PPL = {"quest": [[1.0, 1.1, 1.3, 1.6], [1.0, 1.2, 1.4, 1.5]],
       "retro2": [[1.0, 1.05, 1.15, 1.3], [1.0, 1.1, 1.2, 1.3]]}  # fmt: skip
#: fidelity: (top1_agreement, kl_full_method) for the 2 samples.
FIDELITY = {"quest": [(0.90, 0.20), (0.86, 0.30)], "retro2": [(0.94, 0.12), (0.90, 0.18)]}

METHOD = {
    "full": ("full", {}),
    "streaming": ("streaming", {}),
    "tova": ("tova", {}),
    "quest": ("quest", {}),
    "retro2": ("retro", {"method.window": 2}),
    "retro4": ("retro", {"method.window": 4}),
    "retro8": ("retro", {"method.window": 8}),
}
STEP_MS = {
    "full": 9.0,
    "streaming": 3.0,
    "tova": 3.5,
    "quest": 4.0,
    "retro2": 4.4,
    "retro4": 5.0,
    "retro8": 6.0,
}


def _runs() -> list[dict[str, Any]]:
    """Every run of the store: {name, task, dataset, n, seed, budget, correct (longgenbench counts)}."""
    runs = []

    def add(
        name: str, task: str, dataset: str, n: int | None, seed: int, budget: float, correct=None
    ) -> None:
        runs.append({"name": name, "task": task, "dataset": dataset, "n": n, "seed": seed, "budget": budget,
                     "correct": correct})  # fmt: skip

    for (name, dataset), counts in CORRECT.items():
        for n in (15, 30) if name in ("full", "quest", "retro2") and dataset == "gsm8k" else (15,):
            for seed in (0, 1) if (name in ("quest", "retro2") and dataset == "gsm8k" and n == 15) else (0,):
                add(
                    name,
                    "longgenbench",
                    dataset,
                    n,
                    seed,
                    0.15,
                    [min(n, c * (n // 15) + seed) for c in counts],
                )
    for (name, budget), counts in SWEEP.items():
        add(name, "longgenbench", "gsm8k", 15, 0, budget, counts)
    for name in PPL:
        add(name, "ppl", "stdlib", None, 0, 0.15)
    for name in FIDELITY:
        add(name, "fidelity", "gsm8k", 15, 0, 0.15)
    return runs


def _compose(method: str, task: str) -> Any:
    from hydra import compose, initialize_config_dir

    from retrobench.cli import conf_dir

    overrides = ["model=tiny_random", f"method={method}", f"task={task}"]
    if task == "ppl":
        overrides += [
            "task.context_tokens=512",
            "task.eval_tokens=128",
            "task.bucket_tokens=32",
            "task.num_samples=2",
        ]
    if task == "fidelity":
        overrides += ["task.source_options={num_questions: 15}", "task.num_samples=2"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def _sample(run: dict[str, Any], i: int, label: str) -> dict[str, Any]:
    ms = STEP_MS[run["name"]] * (1 + 0.01 * i)
    exposure = EXPOSURE.get(run["name"], 1.0)
    stats = {"attended_kv": 300.0 + i, "context": 2000.0 + 10 * i, "exposure": exposure + 0.01 * (i - 1),
             "pages_selected": 19.0, "resident_kv": 2000.0 + 10 * i, "kv_bytes": 2.0e6, "peak_memory_bytes": 5.0e8}  # fmt: skip
    if run["name"] in ("streaming", "tova"):
        stats["resident_kv"] = 300.0 + i
    if run["task"] == "longgenbench":
        n, correct = run["n"], run["correct"][i]
        sid = f"longgenbench-{run['dataset']}-synthetic-n{n}-s{run['seed']}-{i}"
        answered = max(correct, n - i)  # sample i leaves i questions unanswered
        score = {"accuracy": correct / n, "completion": answered / n, "answered": answered, "correct": correct}
    elif run["task"] == "ppl":
        sid = f"ppl-stdlib-{i}"
        ratios = PPL[run["name"]][i]
        full = [3.0 + 0.1 * b for b in range(4)]
        nll = [f + math.log(r) for f, r in zip(full, ratios)]
        score = {
            "nll": float(np.mean(nll)),
            "tokens": 128.0,
            "completion": 1.0,
            "ppl": math.exp(np.mean(nll)),
        }
        score.update({f"nll_bucket_{b}": v for b, v in enumerate(nll)})
        score.update(nll_full=float(np.mean(full)), ppl_ratio=math.exp(np.mean(nll) - np.mean(full)))
        score.update({f"nll_ratio_bucket_{b}": float(r) for b, r in enumerate(ratios)})
    else:
        sid = f"longgenbench-gsm8k-synthetic-n15-s0-{i}"
        top1, kl = FIDELITY[run["name"]][i]
        score = {"top1_agreement": top1, "first_divergence": 5.0 + i, "kl_full_method": kl, "tokens": 64.0,
                 "completion": 1.0, "mass_recall": 0.8 + 0.05 * i, "attn_out_rel_err": 0.2 - 0.05 * i}  # fmt: skip
    return {
        "id": sid,
        "index": i,
        "seed": run["seed"],
        "method": METHOD[run["name"]][0],
        "task": run["task"],
        "task_version": "1",
        "model": "tiny_random",
        "backend": "torch",
        "prompt_tokens": 2000 + 10 * i,
        "new_tokens": 5,
        "finish_reason": "teacher" if run["task"] != "longgenbench" else "length",
        "output": f"({label} sample {i}: synthetic fixture, no model ran)",
        "score": score,
        "ttft_s": 0.2 + 0.01 * i,
        "tpot_s": {"mean": ms / 1000, "p50": ms / 1000, "p90": ms / 1000 * 1.1},
        "step_times_s": [round(ms / 1000 * (1 + 0.02 * k), 6) for k in range(4)],
        "stats": stats,
        "wall_s": 0.5 + 0.1 * i,
    }


ENV = {"git_sha": "fixture", "git_dirty": False, "python": "3.11", "torch": "2.13.0+cpu", "transformers": "5.23.0",
       "triton": None, "hydra": "1.3.8", "retrobench": "0.1.0", "backend": "torch", "device": "cpu",
       "device_name": "fixture-cpu", "hostname": "fixture", "timestamp": "2026-01-01T00:00:00+00:00",
       "note": "synthetic scores written by tests/test_report.py::build_store; no model ran"}  # fmt: skip

BENCH = """method,context,budget,window,batch,p10_ms,p50_ms,p90_ms,device
full,8192,2048,,1,11.0,11.5,12.0,fixture-gpu
full,16384,2048,,1,15.0,15.5,16.0,fixture-gpu
full,32768,2048,,1,23.0,23.5,24.5,fixture-gpu
quest,8192,2048,,1,6.0,6.2,6.5,fixture-gpu
quest,16384,2048,,1,6.3,6.5,6.8,fixture-gpu
quest,32768,2048,,1,6.6,6.8,7.1,fixture-gpu
retro,8192,2048,2,1,6.6,6.8,7.1,fixture-gpu
retro,16384,2048,2,1,6.9,7.1,7.4,fixture-gpu
retro,32768,2048,2,1,7.2,7.5,7.8,fixture-gpu
retro,8192,2048,8,1,7.8,8.1,8.4,fixture-gpu
retro,16384,2048,8,1,8.2,8.4,8.8,fixture-gpu
retro,32768,2048,8,1,8.4,8.7,9.1,fixture-gpu
"""


def build_store(root: Path) -> dict[str, str]:
    """Write the store under ``root`` (``runs/`` and ``bench/latency.csv``); returns {run name: hash}.

    Run names: ``<method label>/<task>/<dataset>/n<n>/b<budget>/s<seed>``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from retrobench.store import results
    from retrobench.store.metrics import aggregate

    hashes, composed = {}, {}
    for run in _runs():
        method, overrides = METHOD[run["name"]]
        key = (method, run["task"])
        if key not in composed:
            composed[key] = _compose(method, run["task"])
        cfg = composed[key].copy()
        for path, value in overrides.items():
            OmegaConf.update(cfg, path, value)
        OmegaConf.update(cfg, "seed", run["seed"])
        if method != "full":
            OmegaConf.update(cfg, "method.budget.fraction", run["budget"])
        if run["task"] == "longgenbench":
            OmegaConf.update(cfg, "task.dataset", run["dataset"])
            OmegaConf.update(cfg, "task.num_questions", run["n"])
            OmegaConf.update(cfg, "task.num_samples", 3)
        method_obj = instantiate(cfg.method, _convert_="all")
        task_obj = instantiate(cfg.task, _convert_="all")
        folder = root / "runs" / results.run_hash(cfg)
        folder.mkdir(parents=True, exist_ok=False)
        (folder / results.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        results.write_json(folder / results.ENV_FILE, ENV)
        count = 3 if run["task"] == "longgenbench" else 2
        for i in range(count):
            results.append_sample(folder / results.SAMPLES_FILE, _sample(run, i, run["name"]))
        rows = results.read_samples(folder / results.SAMPLES_FILE)
        record = {
            "run": folder.name,
            "method": method_obj.name,
            "method_settings": method_obj.settings(),
            "task": task_obj.name,
            "task_version": task_obj.version,
            "task_settings": task_obj.settings(),
            "model": cfg.model.get("name"),
            "seed": run["seed"],
            "backend": "torch",
            "device": "cpu",
            **aggregate(rows),
        }
        results.write_json(folder / results.METRICS_FILE, record)
        name = f"{run['name']}/{run['task']}/{run['dataset']}/n{run['n']}/b{run['budget']}/s{run['seed']}"
        hashes[name] = folder.name
    (root / "bench").mkdir(parents=True, exist_ok=True)
    (root / "bench" / "latency.csv").write_text(BENCH)
    return hashes


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("store")
    return root, build_store(root)


@pytest.fixture(scope="module")
def tables(store):
    root, _ = store
    return load_runs(root), load_samples(root)


def _acc(name: str, dataset: str, ns=(15,), seeds=(0,), budget=0.15) -> list[float]:
    out = []
    for run in _runs():
        if (run["name"], run["task"], run["dataset"], run["budget"]) == (name, "longgenbench", dataset, budget) \
                and run["n"] in ns and run["seed"] in seeds:  # fmt: skip
            out += [c / run["n"] for c in run["correct"]]
    return out


# ---- tables -------------------------------------------------------------------------------------------


def test_labels_name_the_settings_that_vary_within_a_task() -> None:
    from retrobench.store.tables import label_runs

    rows = [
        {"method": "quest", "task": "longgenbench", "engine.temperature": 0.0, "budget_fraction": 0.15},
        {"method": "quest", "task": "longgenbench", "engine.temperature": 0.0, "budget_fraction": 0.05},
        {"method": "quest", "task": "reasoning", "engine.temperature": 0.6, "budget_fraction": 0.15},
        {"method": "quest", "task": "ppl", "engine.page_size": 16},
        {"method": "quest", "task": "ppl", "engine.page_size": 32},
        {"method": "retro", "task": "reasoning", "engine.temperature": 0.6, "window": 2, "base": "quest"},
        {"method": "retro", "task": "reasoning", "engine.temperature": 0.6, "window": 2, "base": "infllm"},
    ]
    label_runs(rows)
    assert [r["label"] for r in rows] == [
        "quest", "quest", "quest", "quest(engine.page_size=16)", "quest(engine.page_size=32)",
        "retro(w=2, base=quest)", "retro(w=2, base=infllm)"]  # fmt: skip


def test_runs_and_samples_tables(store, tables) -> None:
    _, hashes = store
    runs, samples = tables
    assert len(runs) == len(hashes) == len(_runs())
    assert set(runs["run"]) == set(hashes.values())
    row = runs[runs["run"] == hashes["retro4/longgenbench/gsm8k/n15/b0.15/s0"]].iloc[0]
    assert (row["method"], row["label"], row["base"], row["window"]) == ("retro", "retro(w=4)", "quest", 4)
    assert (row["budget_fraction"], row["dataset"], row["num_questions"], row["seed"]) == (
        0.15,
        "gsm8k",
        15,
        0,
    )
    assert row["backend"] == "torch" and row["model"] == "tiny_random" and row["task"] == "longgenbench"
    assert row["accuracy"] == pytest.approx(np.mean([c / 15 for c in CORRECT[("retro4", "gsm8k")]]))
    assert row["exposure"] == pytest.approx(1.36) and row["wall_time_s"] == pytest.approx(0.5 + 0.6 + 0.7)
    assert set(runs.attrs["metrics"]) >= {"accuracy", "exposure", "tpot_p50_s", "wall_time_s", "n"}
    assert set(runs.loc[runs["method"] == "quest", "label"]) == {"quest"}
    ppl = runs[runs["task"] == "ppl"].iloc[0]
    assert ppl["dataset"] == "stdlib" and ppl["task.bucket_tokens"] == 32
    fid = runs[runs["task"] == "fidelity"].iloc[0]
    assert (fid["dataset"], fid["num_questions"]) == ("gsm8k", 15)

    assert len(samples) == sum(3 if r["task"] == "longgenbench" else 2 for r in _runs())
    s = samples[samples["run"] == hashes["quest/longgenbench/gsm8k/n30/b0.15/s0"]]
    assert sorted(s["accuracy"]) == pytest.approx(sorted(c * 2 / 30 for c in CORRECT[("quest", "gsm8k")]))
    assert set(s["label"]) == {"quest"} and "exposure" in s and "nll_ratio_bucket_3" in samples
    assert "output" not in samples.columns


def test_summary_means_and_cis(tables) -> None:
    from retrobench import report
    from retrobench.store.metrics import bootstrap_ci

    _, samples = tables
    lgb = report.select(samples, {"task": "longgenbench", "budget_fraction": 0.15})
    stats = report.summary(lgb, ["dataset", "num_questions", "label"], "accuracy")
    row = report.select(stats, {"dataset": "gsm8k", "num_questions": 15, "label": "quest"}).iloc[0]
    expected = _acc("quest", "gsm8k", seeds=(0, 1))  # seeds pooled
    assert row["n"] == 6 and row["runs"] == 2
    assert row["mean"] == pytest.approx(np.mean(expected))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci(sorted(expected)))
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    whole = report.summary(samples[samples["task"] == "ppl"], [], "ppl_ratio")
    assert len(whole) == 1 and whole["n"].iloc[0] == 4 and whole["runs"].iloc[0] == 2


def test_paired_differences(tables) -> None:
    from retrobench import report
    from retrobench.store.metrics import paired_difference

    _, samples = tables
    lgb = report.select(samples, {"task": "longgenbench", "budget_fraction": 0.15})
    diff = report.paired(
        lgb, {"label": "retro(w=2)"}, {"label": "quest"}, "accuracy", ["dataset", "num_questions"]
    )
    row = report.select(diff, {"dataset": "csqa", "num_questions": 15}).iloc[0]
    d = [(a - b) / 15 for a, b in zip(CORRECT[("retro2", "csqa")], CORRECT[("quest", "csqa")])]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(d)) == pytest.approx(4 / 45)
    ref = paired_difference(dict(enumerate(d)), {i: 0.0 for i in range(3)})
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref["ci_low"], ref["ci_high"]))
    gsm = report.select(diff, {"dataset": "gsm8k", "num_questions": 15}).iloc[0]
    assert gsm["n"] == 6  # both seeds pair up by (id, seed)
    assert (gsm["label_a"], gsm["label_b"]) == ("retro(w=2)", "quest")
    with pytest.raises(ValueError, match="several runs"):  # two retro windows on the same samples
        report.paired(lgb, {"method": "retro"}, {"method": "quest"}, "accuracy", ["dataset", "num_questions"])
    every = report.paired_vs_base(lgb, "accuracy", ["dataset", "num_questions"])
    assert set(every["label_a"]) == {"retro(w=2)", "retro(w=4)", "retro(w=8)"} and set(every["label_b"]) == {
        "quest"
    }


def test_paper_numbers_are_data_with_a_source_each(tmp_path: Path) -> None:
    """The paper's numbers live in ``report/paper_numbers.yaml`` (each naming its table in ``sources``);
    one small reader turns them into :class:`PaperNumber` rows and names a bad field or source."""
    import yaml

    from retrobench.report.paper_numbers import DATA, PAPER_NUMBERS, load_paper_numbers

    data = yaml.safe_load(DATA.read_text())
    assert len(PAPER_NUMBERS) == len(data["numbers"]) and {e["source"] for e in data["numbers"]} <= set(data["sources"])
    assert all(n.source.startswith(tuple(data["sources"].values())) for n in PAPER_NUMBERS)
    bad = {**data, "numbers": [{**data["numbers"][0], "source": "nowhere"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, allow_unicode=True))
    with pytest.raises(ValueError, match="source=nowhere is not a source; allowed: .*main"):
        load_paper_numbers(tmp_path / "bad.yaml")


def test_paper_table_gaps(tables) -> None:
    from retrobench import report
    from retrobench.report.paper_numbers import PAPER_NUMBERS, by_key, main_table

    _, samples = tables
    assert main_table()["gsm8k"] == {
        "full": 61.8,
        "streaming": 0.0,
        "tova": 0.2,
        "quest": 52.6,
        "retro": 56.5,
    }
    assert main_table()["mmlu"]["retro"] == 55.3 and main_table()["csqa"]["tova"] == 8.1
    assert all(n.source for n in PAPER_NUMBERS) and len({n.key for n in PAPER_NUMBERS}) == len(PAPER_NUMBERS)
    table = report.paper_table(samples, report.read_bench(FIXTURE / "bench"))
    row = table[table["key"] == "main/gsm8k/quest"].iloc[0]
    ours = 100 * np.mean(_acc("quest", "gsm8k", ns=(15, 30), seeds=(0, 1)))  # pooled over n and seeds
    assert row["ours"] == pytest.approx(ours) and row["gap"] == pytest.approx(ours - 52.6)
    assert row["paper"] == 52.6 and row["model"] == "tiny_random" and not row["same_model"]
    assert row["n"] == 9 and "n=15,30" in row["note"] and "seeds=0,1" in row["note"]
    delta = table[table["key"] == "main/gsm8k/retro-quest"].iloc[0]
    d = [
        (a - b) / 15 for a, b in zip(CORRECT[("retro2", "gsm8k")], CORRECT[("quest", "gsm8k")])
    ] * 2  # seeds 0, 1
    d += [2 * (a - b) / 30 for a, b in zip(CORRECT[("retro2", "gsm8k")], CORRECT[("quest", "gsm8k")])]
    assert (
        delta["n"] == 9
        and delta["ours"] == pytest.approx(100 * np.mean(d))
        and delta["gap"] == pytest.approx(100 * np.mean(d) - 3.9)
    )
    assert delta["label"] == "retro(w=2) - quest"
    mmlu = table[table["key"] == "main/mmlu/quest"].iloc[0]
    assert mmlu["n"] == 0 and mmlu["note"] == "no runs" and math.isnan(mmlu["ours"])  # never fabricated
    exp = table[table["key"] == "exposure/w8"].iloc[0]
    assert exp["ours"] == pytest.approx(1.61) and exp["gap"] == pytest.approx(
        1.61 - by_key("exposure/w8").value
    )
    lat = table[table["key"] == "latency/w2"].iloc[0]
    assert lat["ours"] == pytest.approx(np.mean([0.6, 0.6, 0.7])) and lat["n"] == 3
    assert (
        lat["gap"] == pytest.approx(lat["ours"] - 1.0) and lat["bound"] == "<" and lat["same_model"] is None
    )
    same = report.paper_table(samples, same_model_only=True)
    assert (same["n"] == 0).all()  # tiny_random is not the paper's model


def test_write_report_files_and_numbers(store, tmp_path: Path) -> None:
    from retrobench import report

    root, _ = store
    out = tmp_path / "report"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "stale.png").write_bytes(b"old")
    path = report.write_report(root, out)
    text = path.read_text()
    for section in ("## LongGenBench accuracy", "## Paper numbers beside ours", "## Window ablation",
                    "## Budget sweep", "## Effective KV exposure", "## Fidelity to full attention",
                    "## Perplexity over position", "## Decode latency and memory", "### latency.csv"):  # fmt: skip
        assert section in text, section
    assert "no runs" in text  # e.g. the paper's MMLU rows: this store has no MMLU run
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    for name in ("accuracy_vs_window", "accuracy_vs_budget", "exposure_vs_window", "exposure_vs_accuracy",
                 "ppl_ratio_over_position", "latency_vs_context_latency", "longgenbench_paired"):  # fmt: skip
        assert f"{name}.png" in pngs
    assert "stale.png" not in pngs
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert f"plots/{png.name}" in text
    import pandas as pd

    acc = pd.read_csv(out / "tables" / "longgenbench_accuracy.csv")
    row = acc[
        (acc["label"] == "retro(w=2)") & (acc["dataset"] == "csqa") & (acc["num_questions"] == 15)
    ].iloc[0]
    assert row["mean"] == pytest.approx(np.mean([c / 15 for c in CORRECT[("retro2", "csqa")]]))
    assert f"{100 * row['mean']:.1f} [" in text
    done = pd.read_csv(out / "tables" / "longgenbench_completion.csv")
    comp = done[(done["label"] == "retro(w=2)") & (done["dataset"] == "csqa")].iloc[0]
    expected = [max(c, r["n"] - i) / r["n"] for r in _runs() if (r["name"], r["dataset"]) == ("retro2", "csqa")
                for i, c in enumerate(r["correct"])]  # fmt: skip
    assert comp["mean"] == pytest.approx(np.mean(expected)) and comp["mean"] < 1
    paired = pd.read_csv(out / "tables" / "longgenbench_paired.csv")
    p = paired[
        (paired["dataset"] == "csqa") & (paired["num_questions"] == 15) & (paired["label_a"] == "retro(w=2)")
    ]
    assert p["mean"].iloc[0] == pytest.approx(100 * 4 / 45) and p["unit"].iloc[0] == "pp"
    paper = pd.read_csv(out / "tables" / "paper_comparison.csv")
    gap = paper[paper["key"] == "main/csqa/retro"].iloc[0]
    assert gap["gap"] == pytest.approx(100 * row["mean"] - 60.3)
    win = pd.read_csv(out / "tables" / "window_ablation.csv")
    w = win[(win["dataset"] == "gsm8k") & (win["num_questions"] == 15) & (win["budget_fraction"] == 0.15)]
    assert sorted(w["window"]) == [1, 2, 4, 8]  # quest stands in for w = 1
    assert w.set_index("window")["mean (%)"][8] == pytest.approx(
        round(100 * np.mean(_acc("retro8", "gsm8k")), 1)
    )
    ppl = pd.read_csv(out / "tables" / "ppl_ratio.csv")
    quest = ppl[ppl["label"] == "quest"].iloc[0]
    assert quest["bucket 3"] == pytest.approx(1.55) and quest["bucket 0"] == pytest.approx(1.0)
    over = pd.read_csv(out / "tables" / "bench_latency_overhead.csv")
    assert over.set_index("window")["mean_ms"][8.0] == pytest.approx(np.mean([1.9, 1.9, 1.9]))
    fid = pd.read_csv(out / "tables" / "fidelity_paired.csv")
    kl = fid[fid["metric"] == "kl_full_method"].iloc[0]
    assert kl["mean"] == pytest.approx(np.mean([0.12 - 0.20, 0.18 - 0.30]))


def test_ambiguous_pairs_are_reported_not_fatal(tmp_path: Path) -> None:
    import shutil

    from retrobench import report

    shutil.copytree(FIXTURE, tmp_path / "res")
    quest = report.select(
        load_runs(FIXTURE), {"label": "quest", "task": "longgenbench", "dataset": "csqa"}
    )
    src = tmp_path / "res" / "runs" / quest["run"].iloc[0]
    twin = src.with_name("0twin0000000")
    shutil.copytree(src, twin)  # same samples, a task setting the labels do not show
    record = json.loads((twin / "metrics.json").read_text())
    record["task_settings"]["max_new_tokens"] = 123
    (twin / "metrics.json").write_text(json.dumps(record))
    text = report.write_report(tmp_path / "res").read_text()
    assert "not paired (accuracy): paired: side b has several runs" in text and "0twin0000000" in text


def test_report_on_empty_store_says_no_runs(tmp_path: Path) -> None:
    from retrobench import report

    (tmp_path / "res" / "runs").mkdir(parents=True)
    text = report.write_report(tmp_path / "res").read_text()
    assert text.count("no runs") >= 8
    assert (tmp_path / "res" / "report" / "tables" / "paper_comparison.csv").is_file()
    assert not list((tmp_path / "res" / "report").glob("plots/*.png"))


def test_plots_return_figures(tables) -> None:
    from matplotlib.figure import Figure

    from retrobench import report
    from retrobench.report import plots

    _, samples = tables
    bench = report.read_bench(FIXTURE / "bench")["latency"]
    lgb = report.select(samples, {"task": "longgenbench"})
    figures = [
        plots.accuracy_vs_budget(lgb),
        plots.accuracy_vs_window(lgb, facet="dataset"),
        plots.exposure_vs_window(lgb),
        plots.exposure_vs_accuracy(lgb),
        plots.ppl_ratio_over_position(samples[samples["task"] == "ppl"]),
        plots.latency_vs_context(bench),
        plots.accuracy_vs_budget(lgb.iloc[0:0]),  # empty input: a figure saying so, no exception
    ]
    assert all(isinstance(f, Figure) for f in figures)
    lines = figures[1].axes[0].get_lines()
    assert len(figures[1].axes) == 2 and lines
    frame = plots.window_frame(lgb)
    base = frame[frame["method"] == "quest"]
    assert set(base["window"]) == {1.0} and set(base["series"]) == {"retro"}


def test_the_report_reads_which_method_wraps_which_base_from_the_runs(tables) -> None:
    """Issue 15: no hand-kept list of bases or of the settings retro shares with its base; the store's
    reader records per method the settings its runs recorded, and the window plot pairs a run that
    recorded a base and a window with that base's runs on the settings both recorded."""
    from retrobench.report import plots

    _, samples = tables
    settings = samples.attrs["settings"]
    assert {"base", "window", "budget_fraction"} <= set(settings["retro"]) and "window" not in settings["quest"]
    shared = set(plots._shared_settings(samples, "retro", "quest"))
    assert shared == {"selection", "dense_layers", "min_pages", "budget_fraction", "budget_tokens"} & set(samples.columns)
    assert not hasattr(plots, "SHARED_WITH_BASE") and not hasattr(__import__("retrobench.report").report, "BASES")


# ---- CLI ------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONSAFEPATH": "1", "MPLBACKEND": "Agg"}  # fmt: skip


def test_cli_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "retrobench", "report", "--results-dir", str(FIXTURE), "--out", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").is_file() and str(out / "report.md") in proc.stdout
    assert len(list((out / "plots").glob("*.png"))) >= 6
    helped = subprocess.run([sys.executable, "-m", "retrobench", "report", "--help"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert helped.returncode == 0 and "--results-dir" in helped.stdout and "--out" in helped.stdout
    missing = subprocess.run([sys.executable, "-m", "retrobench", "report", "--results-dir", str(tmp_path / "nope")],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert (
        missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    )
    assert not (tmp_path / "nope").exists()


# ---- committed fixture and notebooks -------------------------------------------------------------------


def test_committed_fixture_is_current(store) -> None:
    """The committed store holds the same runs and numbers as a fresh build (run hashes and config
    files may differ after a config default changes; regenerate with ``python tests/test_report.py``)."""
    root, _ = store
    columns = ["task", "label", "dataset", "num_questions", "budget_fraction", "seed"]
    numbers = ["n", "accuracy", "exposure", "tpot_p50_s", "ppl_ratio", "top1_agreement", "kl_full_method"]

    def table(path: Path) -> Any:
        runs = load_runs(path)
        return runs[columns + numbers].sort_values(columns, na_position="first").reset_index(drop=True)

    import pandas as pd

    pd.testing.assert_frame_equal(
        table(FIXTURE), table(root), obj="regenerate with: python tests/test_report.py"
    )
    assert (FIXTURE / "bench" / "latency.csv").read_text() == BENCH
    assert len(load_samples(FIXTURE)) == len(load_samples(root))
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 200_000


def _execute_notebook(path: Path, results_dir: Path) -> dict[str, Any]:
    """Run the code cells of ``path`` in order in one fresh namespace (nbclient is not a dependency)."""
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    namespace: dict[str, Any] = {"__name__": "__main__"}
    os.environ["RETROBENCH_RESULTS"] = str(results_dir)
    try:
        for number, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            assert cell.get("outputs", []) == [] and cell.get("execution_count") is None, (
                "store notebooks without outputs"
            )
            source = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), (
                "plain Python only"
            )
            exec(compile(source, f"{path.name}[{number}]", "exec"), namespace)  # noqa: S102
    finally:
        os.environ.pop("RETROBENCH_RESULTS", None)
    return namespace


@pytest.mark.parametrize("name", ["ablations.ipynb", "latency.ipynb"])
def test_notebooks_execute_on_fixture(name: str) -> None:
    from matplotlib.figure import Figure

    text = (NOTEBOOKS / name).read_text()
    for forbidden in ("retrobench.run", "load_model", "Engine("):  # notebooks only read results
        assert forbidden not in text
    namespace = _execute_notebook(NOTEBOOKS / name, FIXTURE)
    figures = [v for v in namespace.values() if isinstance(v, Figure)]
    assert len(figures) >= 2


def test_the_store_has_one_reader_everywhere() -> None:
    """Issue 15: README, ``--help`` and the notebooks name one reader of the store
    (``retrobench.store.load_runs`` / ``load_samples``) and one set of columns; the report's former
    ``runs_table`` / ``samples_table`` are the same functions."""
    from retrobench import report, store
    from retrobench.cli import USAGE
    from retrobench.store.tables import KEY_COLUMNS

    assert report.runs_table is report.load_runs is store.load_runs is load_runs
    assert report.samples_table is report.load_samples is store.load_samples is load_samples
    runs, samples = load_runs(FIXTURE), load_samples(FIXTURE)
    assert list(runs.columns[: len(KEY_COLUMNS)]) == list(KEY_COLUMNS)
    assert list(samples.columns[: len(KEY_COLUMNS)]) == list(KEY_COLUMNS)
    readme = (ROOT / "README.md").read_text()
    assert "runs_table" not in readme and "samples_table" not in readme
    documented = readme[readme.index('runs = load_runs("results")'):]
    documented = documented[: documented.index("```")]
    assert all(column in documented for column in KEY_COLUMNS), "README: the columns of load_runs"
    assert "retrobench.store.load_runs()" in USAGE and "load_samples()" in USAGE
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        text = path.read_text()
        assert "from retrobench.store import load_runs, load_samples" in text, path.name
        assert "runs_table" not in text and "samples_table" not in text, path.name


def test_latency_notebook_plots_the_committed_decode_table(tmp_path: Path) -> None:
    """``make bench``'s ``results/bench/decode.csv`` (an ``op`` column, many ops) is read, not skipped:
    its decode-step rows become a step-time-vs-context figure."""
    import shutil

    from matplotlib.figure import Figure

    store = tmp_path / "results"
    shutil.copytree(FIXTURE, store)
    shutil.copy(ROOT / "results" / "bench" / "decode.csv", store / "bench" / "decode.csv")
    namespace = _execute_notebook(NOTEBOOKS / "latency.ipynb", store)
    assert "decode" in namespace["bench"] and isinstance(namespace["latency_figures"].get("decode"), Figure)


# ---- wandb ----------------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline ``run-*.wandb`` file (wandb's LevelDB-style log: a 7-byte
    ``:W&B`` header, 32 KiB blocks, chunks with a 7-byte header; types full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_wandb_offline_logs_config_metrics_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    res = tmp_path / "res"
    env = {**_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "retrobench", "run", "experiment=smoke", "logger=wandb", "logger.mode=offline",
         "task.num_samples=1", f"results_dir={res}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (res / "runs").iterdir()
    (offline,) = list((res / "wandb").glob("offline-run-*"))
    images = list(offline.glob("files/media/images/plots/decode_time_over_position*.png"))
    assert images and images[0].read_bytes()[:4] == b"\x89PNG"
    (log,) = list(offline.glob("run-*.wandb"))
    records = _wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["name"] == "tiny_random" and config["engine"]["page_size"] == 16
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") in ("summary", "history"):
            items = r.summary.update if r.WhichOneof("record_type") == "summary" else r.history.item
            for u in items:
                summary["/".join(u.nested_key) if u.nested_key else u.key] = u.value_json
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert float(summary["tpot_p50_s"]) == pytest.approx(metrics["tpot_p50_s"])
    assert float(summary["wall_time_s"]) == pytest.approx(metrics["wall_time_s"])
    assert any(k.startswith("plots/decode_time_over_position") for k in summary)


if __name__ == "__main__":  # regenerate the committed fixture
    import shutil

    if FIXTURE.exists():
        keep = (FIXTURE / "README.md").read_text() if (FIXTURE / "README.md").is_file() else None
        shutil.rmtree(FIXTURE)
        FIXTURE.mkdir(parents=True)
        if keep is not None:
            (FIXTURE / "README.md").write_text(keep)
    build_store(FIXTURE)
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    print(f"wrote {FIXTURE} ({size} bytes)")
