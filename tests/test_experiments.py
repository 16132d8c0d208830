"""The paper's experiments, their grids and ``make reproduce`` (``retrobench/drivers/reproduce.py``).

- every entry of ``conf/reproduce.yaml`` names an experiment overlay and a grid that compose, and
  every experiment overlay is in the list (``smoke`` aside) with its command and paper numbers;
- every grid has a seed axis (ppl: its text windows), and the profiles adapt every entry's task;
- every experiment runs end to end on ``tiny_random`` with the ``tiny`` profile's overrides;
- the driver skips what is finished; killing it midway and starting it again finishes every run
  once, with every sample kept (the test-only list below, on tiny_random);
- a 2-job multirun through the joblib launcher (``hydra/launcher=local_gpus``) on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_when
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from retrobench.drivers import reproduce
from retrobench.cli import conf_dir

CONF = conf_dir()
SPEC = reproduce.load_list()
NAMES = [e["name"] for e in SPEC["experiments"]]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _env() -> dict[str, str]:
    # one torch thread: tiny_random gains nothing from more, and the timing-based kill stays robust on a
    # busy 2-core machine (two processes of 2 OpenMP threads each slow each other down many times over)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def test_every_experiment_is_listed_with_its_command() -> None:
    listed = {e.get("experiment", e["name"]) for e in SPEC["experiments"]}
    assert set(EXPERIMENTS) - listed == {"smoke"}
    for name in EXPERIMENTS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert f"python -m retrobench run experiment={name}" in text, name
    for entry in SPEC["experiments"]:
        assert (CONF / "sweep" / f"{entry.get('sweep', entry['name'])}.yaml").is_file(), entry


@pytest.mark.parametrize("name", NAMES)
def test_entry_composes_with_its_grid(name: str, tmp_path: Path) -> None:
    """The experiment + sweep files compose in MULTIRUN mode, every axis is a key of the config, and
    the first and last jobs of the grid compose."""
    (entry,) = reproduce.entries("paper", [name])
    cfg = _compose(
        [f"experiment={entry.experiment}", f"sweep={entry.sweep}", f"results_dir={tmp_path}"], True
    )
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    axes = reproduce.sweep_axes(entry.sweep)
    assert axes == entry.axes and ("seed" in axes or "task.first_window" in axes)  # replicates everywhere
    for key in axes:
        assert key in cfg.hydra.runtime.choices or OmegaConf.select(cfg, key, default="absent") != "absent", (
            key
        )
    jobs = reproduce.grid(entry, str(tmp_path), [])
    assert len(jobs) >= 2 * 3
    for job in (jobs[0], jobs[-1]):
        _compose(job)


@pytest.mark.parametrize("profile", ["small", "tiny"])
def test_offline_profiles_cover_every_task(profile: str) -> None:
    spec = SPEC["profiles"][profile]
    assert "device=cpu" in spec["overrides"]
    for entry in reproduce.entries(profile):
        assert entry.task in spec["task"], (profile, entry.name)
        keys = [reproduce._key(o) for o in entry.overrides]
        assert len(keys) == len(set(keys)), entry  # an axis replaces its fixed override
        for key, value in (spec.get("axes") or {}).items():
            if key in reproduce.sweep_axes(entry.sweep):
                assert entry.axes[key] == str(value)


def test_extra_overrides_replace_an_axis_or_a_fixed_value(tmp_path: Path) -> None:
    (entry,) = reproduce.entries("small", ["budget_sweep"])
    args = entry.args(str(tmp_path), ["seed=0", "task.num_questions=3", "hydra/launcher=local_gpus"])
    assert [a for a in args if a.startswith("seed=")] == ["seed=0"]
    assert [a for a in args if a.startswith("task.num_questions=")] == ["task.num_questions=3"]
    fractions = entry.axes["method.budget.fraction"].split(",")
    assert len(fractions) == 3  # the small profile's axis replaced the paper's 6 fractions
    assert len(reproduce.grid(entry, str(tmp_path), ["seed=0"])) == 2 * len(fractions)


def test_paper_profile_keeps_the_paper_settings() -> None:
    for entry in reproduce.entries("paper"):
        assert entry.overrides == ["device=cuda"]
        assert entry.axes == reproduce.sweep_axes(entry.sweep)
    cfg = _compose(["experiment=longgenbench_main"])
    assert cfg.model.name == "llama31_8b_instruct" and cfg.task.source == "hub"
    assert cfg.method.window == 2 and cfg.method.budget.fraction == 0.15
    assert _compose(["experiment=reasoning"]).model.name == "r1_distill_llama_8b"
    assert _compose(["experiment=longgenbench_qwen32b"]).model.name == "qwen25_32b_instruct"


def _tiny_job(name: str, results_dir: Path) -> list[str]:
    (entry,) = reproduce.entries("tiny", [name])
    reproduce._substitute(entry, results_dir / reproduce.OFFLINE_FOLDER)
    return reproduce.grid(entry, str(results_dir), [])[-1]  # the last job: largest n / last method


@pytest.mark.parametrize("name", NAMES)
def test_experiment_runs_end_to_end_on_tiny_random(name: str, tmp_path: Path) -> None:
    """One job of each entry's grid (the tiny profile: tiny_random, offline data, short lengths)."""
    from retrobench.store import results
    from retrobench.runner.run import execute

    reproduce.write_offline_data(tmp_path / reproduce.OFFLINE_FOLDER)
    cfg = _compose(_tiny_job(name, tmp_path))
    assert cfg.model.name == "tiny_random"
    folder = execute(cfg)
    assert folder is not None and results.finished(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metrics"]["n"] >= 1 and metrics["model"] == "tiny_random"


@pytest.mark.parametrize("profile", ["small", "paper"])
def test_planner_folders_equal_full_composition(profile: str, tmp_path: Path) -> None:
    """The planner's shared compositions give the folders composing each job in full gives."""
    from hydra import compose, initialize_config_dir

    from retrobench.store import results

    res = str(tmp_path / "res")
    for entry in reproduce.entries(profile, None):
        entry = reproduce._substitute(entry, tmp_path / "res" / "offline")
        jobs = reproduce.grid(entry, res, [])
        fast = reproduce.run_folders(entry, res, [])
        assert len(fast) == len(jobs)
        picked = sorted({0, len(jobs) // 2, len(jobs) - 1})  # first, middle, last job of every entry
        with initialize_config_dir(str(CONF), version_base="1.3"):
            for i in picked:
                full = compose("config", overrides=[o for o in jobs[i] if not o.startswith("hydra")])
                assert results.run_dir(full) == fast[i], (entry.name, jobs[i])


def test_plan_writes_nothing_and_answers_fast(tmp_path: Path) -> None:
    """``make reproduce-plan`` leaves the results folder byte for byte as it was (no offline data)."""
    import time

    results = tmp_path / "res"
    (results / "runs" / "abc").mkdir(parents=True)
    (results / "runs" / "abc" / "samples.jsonl").write_text('{"id": "x"}\n')
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "retrobench.reproduce", "--dry-run", "--profile", "small",
                           "--results-dir", str(results)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
    assert sorted(results.rglob("*")) == sorted([results / "runs", results / "runs" / "abc", *before])
    assert "distinct" in proc.stdout and time.perf_counter() - started < 30


def test_plan_states_gpu_time_at_the_measured_throughput(tmp_path: Path) -> None:
    """Per model, the planned runs' decode tokens (samples x max_new_tokens, unfinished runs only)
    over the batched tokens/s of bench_batch's table."""
    entry = next(e for e in reproduce.entries("paper") if e.task == "reasoning")
    (counts,) = reproduce.plan([entry], str(tmp_path), ["seed=0"])
    jobs = reproduce.run_configs(entry, str(tmp_path), ["seed=0"])
    from hydra.utils import instantiate

    expected: dict[str, int] = {}
    for _, cfg in jobs:
        samples, per = instantiate(cfg.task, _convert_="all").workload()
        expected[cfg.model.name] = expected.get(cfg.model.name, 0) + samples * per
    assert counts["tokens"] == expected and sum(expected.values()) > 0
    table = tmp_path / "batch.csv"
    table.write_text("method,task,batch_size,samples,new_tokens,wall_s,tokens_per_s,model,device,git_sha\n"
                     "retro,longgenbench,64,64,32768,40.0,1000.0,llama31_8b_random,GPU,abc1234\n"
                     "retro,longgenbench,1,8,4096,64.0,64.0,llama31_8b_random,GPU,abc1234\n")  # fmt: skip
    rate = reproduce.measured_throughput(table)
    assert rate is not None and rate["tokens_per_s"] == 1000.0 and rate["batch_size"] == "64"
    lines = reproduce.gpu_time_lines({"a": 3_600_000, "b": 7_200_000}, rate)
    assert "1000 tokens/s" in lines[0] and "batch 64" in lines[0]
    assert lines[1] == "  b: 7.20M tokens, 2.00 GPU-h" and lines[2] == "  a: 3.60M tokens, 1.00 GPU-h"
    assert "total: 10.80M tokens, 3.00 GPU-h" in lines[3]
    assert "no measured throughput" in reproduce.gpu_time_lines({"a": 1}, None)[0]
    # finished runs need no GPU time
    folder = jobs[0][0]
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    (again,) = reproduce.plan([entry], str(tmp_path), ["seed=0"])
    assert sum(again["tokens"].values()) < sum(expected.values())


def test_offline_reasoning_data_grades(tmp_path: Path) -> None:
    from retrobench.tasks.reasoning import ReasoningTask

    reproduce.write_offline_data(tmp_path)
    for benchmark in ("aime24", "gpqa_diamond"):
        task = ReasoningTask(benchmark=benchmark, source="local", path=str(tmp_path / f"{benchmark}.jsonl"))
        samples = task.samples(None, 0)
        assert len(samples) >= 25
        gold = samples[0].reference
        answer = f"\\boxed{{{gold}}}" if benchmark == "aime24" else f"The answer is ({gold})."
        assert task.score(samples[0], answer)["accuracy"] == 1.0


# ---- the driver: skip, kill and resume ---------------------------------------------------------------

KILL_LIST = """
experiments:
  - name: longgenbench_main
  - name: budget_sweep
profiles:
  test:
    overrides: [model=tiny_random, device=cpu]
    task:
      longgenbench: [task.source=synthetic, task.num_samples=3, task.num_shots=1,
                     task.tokens_per_question=16, task.num_questions=2, task.dataset=gsm8k]
    axes:
      task.dataset: gsm8k
      task.num_questions: 2
      seed: 0,1
    entries:
      longgenbench_main: {axes: {method: "full,quest"}}
      budget_sweep: {axes: {method: quest, method.budget.fraction: "0.1,0.15"}}
"""


def _driver(list_file: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "retrobench.reproduce", "--list", str(list_file), "--profile", "test",
            "--results-dir", str(results), "--no-report"]  # fmt: skip


def _lines(results: Path) -> dict[str, list[bytes]]:
    """Per run folder, the complete lines of samples.jsonl as bytes."""
    out = {}
    for path in sorted((results / "runs").glob("*/samples.jsonl")) if (results / "runs").is_dir() else []:
        out[path.parent.name] = [line for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    return out


def _state(results: Path) -> dict[str, tuple[bool, list[str]]]:
    out = {}
    for folder in sorted((results / "runs").glob("*")) if (results / "runs").is_dir() else []:
        path = folder / "samples.jsonl"
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.is_file() else []
        out[folder.name] = ((folder / "metrics.json").is_file(), ids)
    return out


def test_killed_reproduce_resumes_without_repeating_or_losing(tmp_path: Path) -> None:
    """SIGKILL the driver (its whole process group) while a run is half done and after at least one run
    has finished; the same command then finishes all 6 distinct runs (main 4, budget 4, 2 shared)."""
    list_file, results = tmp_path / "list.yaml", tmp_path / "res"
    list_file.write_text(KILL_LIST)
    proc = subprocess.Popen(_driver(list_file, results), cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def ready() -> bool:  # at least one run finished and another half done
        state = _state(results).values()
        return any(done for done, _ in state) and any(ids and not done for done, ids in state)

    kill_when(proc, ready, 240, "the driver")
    before = _state(results)
    written = _lines(results)
    finished = {k for k, (done, _) in before.items() if done}
    partial = {k: ids for k, (done, ids) in before.items() if not done and ids}
    assert finished and partial and len(finished) < 6, before
    stamps = {k: (results / "runs" / k / "metrics.json").stat().st_mtime_ns for k in finished}

    again = subprocess.run(_driver(list_file, results), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300, check=False)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    after = _state(results)
    assert len(after) == 6 and all(done for done, _ in after.values()), after
    for key, (_, ids) in after.items():
        assert len(ids) == 3 and len(set(ids)) == 3, (key, ids)  # no sample lost or duplicated
        assert set(partial.get(key, [])) <= set(ids)
    kept = _lines(results)
    for key, lines in written.items():  # rows written before the kill kept byte for byte, not regenerated
        assert kept[key][: len(lines)] == lines, key
    for key, stamp in stamps.items():  # finished runs were skipped, not redone
        assert (results / "runs" / key / "metrics.json").stat().st_mtime_ns == stamp
    assert "2/2 experiments ok" in again.stdout

    third = subprocess.run(_driver(list_file, results), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300, check=False)  # fmt: skip
    assert third.returncode == 0 and third.stdout.count("nothing to run") == 2, third.stdout


# ---- scaling out: the joblib launcher ----------------------------------------------------------------


def test_joblib_launcher_runs_two_jobs_in_two_workers(tmp_path: Path) -> None:
    results = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "retrobench", "run", "-m", "experiment=smoke", "hydra/launcher=local_gpus",
         "hydra.launcher.n_jobs=2", "seed=0,1", f"results_dir={results}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    folders = sorted((results / "runs").glob("*/metrics.json"))
    assert len(folders) == 2
    envs = [json.loads((f.parent / "env.json").read_text()) for f in folders]
    assert {e["launcher"] for e in envs} == {"local_gpus"}
    assert sorted(e["job_num"] for e in envs) == [0, 1]
    assert len({e["pid"] for e in envs}) == 2 and proc.stdout.count("done:") == 2  # two loky workers
    assert all(e["device"] == "cpu" and "gpu_uuid" not in e for e in envs)
    seeds = sorted(json.loads(f.read_text())["seed"] for f in folders)
    assert seeds == [0, 1]


def test_launcher_configs_compose() -> None:
    import retrobench.runner.gpus  # noqa: F401 - registers ${retrobench_gpus:} (as `python -m retrobench run` does)

    joblib = _compose(["hydra/launcher=local_gpus"], hydra=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and int(joblib.n_jobs) >= 1  # ${retrobench_gpus:}
    slurm = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.partition == "gpu"


@pytest.mark.slow
def test_tiny_profile_runs_every_entry_through_the_driver(tmp_path: Path) -> None:
    """``make reproduce`` end to end on tiny_random (every entry's whole grid; minutes), then a rerun
    that has nothing left to do."""
    results = tmp_path / "res"
    cmd = [sys.executable, "-m", "retrobench.reproduce", "--profile", "tiny", "--results-dir", str(results),
           "--no-report"]  # fmt: skip
    first = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1800, check=False
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"{len(NAMES)}/{len(NAMES)} experiments ok" in first.stdout
    again = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert again.returncode == 0 and again.stdout.count("nothing to run") == len(NAMES), again.stdout
