"""End-to-end CLI tests on ``tiny_random``: the result store, skip/overwrite, kill-and-resume, bad input.

Each case starts ``python -m retrobench`` in a subprocess (as a user would), from a temporary
working directory, offline, with wandb disabled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_when

SMALL = ["model=tiny_random", "task=synthetic", "task.context_tokens=320", "task.num_queries=2"]


def _env(**extra: str | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONSAFEPATH"] = "1"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrobench", *args]


def rb(tmp: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(*args), check=False, cwd=tmp, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def _run_folder(results: Path) -> Path:
    folders = [p.parent for p in (results / "runs").glob("*/config.yaml")]
    assert len(folders) == 1, folders
    return folders[0]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_run_writes_store_skips_and_overwrites(tmp_path: Path) -> None:
    results = tmp_path / "res"
    args = ["run", *SMALL, "task.num_samples=3", "task.max_new_tokens=8", f"results_dir={results}"]
    first = rb(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    folder = _run_folder(results)
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "env.json", "samples.jsonl", "metrics.json"}
    rows = _rows(folder)
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    assert {"accuracy", "completion"} <= set(rows[0]["score"]) and rows[0]["new_tokens"] >= 1
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (
        metrics["metrics"]["n"] == 3 and metrics["backend"] == "torch" and metrics["model"] == "tiny_random"
    )
    for key in (
        "accuracy",
        "completion",
        "attended_kv",
        "resident_kv",
        "ttft_p50_s",
        "tpot_p50_s",
        "tpot_p90_s",
    ):
        assert key in metrics["metrics"], key
    env = json.loads((folder / "env.json").read_text())
    assert {"git_sha", "git_dirty", "torch", "transformers", "device", "backend"} <= set(env)
    assert "tiny_random" in (folder / "config.yaml").read_text()
    assert not (results / "hydra").exists()  # Hydra's empty log dirs are cleaned up

    stamp = (folder / "metrics.json").stat().st_mtime_ns
    again = rb(tmp_path, *args)
    assert again.returncode == 0 and "skip:" in again.stdout
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp

    forced = rb(tmp_path, *args, "overwrite=true")
    assert forced.returncode == 0, forced.stderr
    assert _run_folder(results) == folder  # overwrite is not part of the hash
    assert (folder / "metrics.json").stat().st_mtime_ns != stamp
    assert len(_rows(folder)) == 3


@pytest.mark.parametrize("batch", [1, 3])
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path: Path, batch: int) -> None:
    """Killed after its first finished sample(s), at batch 1 and in a continuous batch of 3."""
    results = tmp_path / "res"
    n = 4 if batch == 1 else 5
    args = ["run", *SMALL, f"task.num_samples={n}", "task.max_new_tokens=96", "task.stop=[]",
            f"engine.batch_size={batch}"]  # fmt: skip
    proc = subprocess.Popen(
        _cmd(*args, f"results_dir={results}"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:  # one sample written
        files = list((results / "runs").glob("*/samples.jsonl")) if (results / "runs").exists() else []
        return bool(files) and files[0].read_text().count("\n") >= 1

    kill_when(proc, ready, 120, "the run")
    folder = _run_folder(results)
    assert not (folder / "metrics.json").exists(), "run finished before the kill; make it longer"
    killed = len(_rows(folder))
    assert 1 <= killed < n
    written = (folder / "samples.jsonl").read_bytes()
    written = written[: written.rfind(b"\n") + 1]  # complete lines only
    with open(folder / "samples.jsonl", "a") as f:  # as if killed in the middle of a write
        f.write('{"id": "synthetic-half-writ')

    resumed = rb(tmp_path, *args, f"results_dir={results}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {killed} of {n} samples done, 1 partial line dropped" in resumed.stdout, resumed.stdout
    summary = resumed.stdout[resumed.stdout.index("done: ") :]  # the end-of-run summary
    for part in (f"synthetic on tiny_random with retro, n={n}", "accuracy", "exposure", "ms/token", "run folder:",
                 f"next: python -m retrobench report --results-dir {results}"):  # fmt: skip
        assert part in summary, (part, summary)
    rows = _rows(folder)
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    # the rows written before the kill are kept byte for byte (timings differ if regenerated)
    assert written and (folder / "samples.jsonl").read_bytes().startswith(written)
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["n"] == n
    env = json.loads((folder / "env.json").read_text())
    assert len(env.get("resumes", [])) == 1
    assert {r["batch_size"] for r in rows[killed:]} == {min(batch, n - killed)}


def _run_in_process(*overrides: str) -> None:
    """``run <overrides>`` as the CLI composes it (budget spellings, checks), executed in this process."""
    from hydra import compose, initialize_config_dir

    from retrobench import cli
    from retrobench.runner.run import execute

    prepared, error = cli.prepare_run(list(overrides))
    assert error is None, error
    with initialize_config_dir(str(cli.conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=prepared)
    assert execute(cfg) is not None


def test_batched_run_equals_batch_one_and_shares_its_folder(tmp_path: Path) -> None:
    """engine.batch_size changes speed, not results: the same outputs, scores and accounting, the same
    run folder (the batch size is not part of the run hash), rows in finishing order. In this process:
    the CLI's own runs (batch 1 and 3) are the subprocess tests above."""
    args = [*SMALL, "method=retro", "task.num_samples=5", "task.max_new_tokens=12"]
    rows = {}
    for batch in (1, 3):
        results = tmp_path / f"b{batch}"
        _run_in_process(*args, f"engine.batch_size={batch}", f"results_dir={results}")
        folder = _run_folder(results)
        rows[batch] = (folder.name, sorted(_rows(folder), key=lambda r: r["index"]))
        assert json.loads((folder / "metrics.json").read_text())["batch_size"] == batch
    assert rows[1][0] == rows[3][0]
    for one, three in zip(rows[1][1], rows[3][1]):
        assert (one["id"], one["output"], one["score"], one["new_tokens"]) == (three["id"], three["output"],
                                                                             three["score"], three["new_tokens"])
        for key in ("attended_kv", "resident_kv", "exposure", "pages_selected"):
            assert one["stats"][key] == pytest.approx(three["stats"][key], rel=1e-6)


BAD_INPUTS = {
    "unknown_method": (["method=nope"], "method=nope", {}),
    "unknown_model": (["model=nope"], "model=nope", {}),
    "page_size": (["engine.page_size=12"], "engine.page_size", {}),
    "triton_without_gpu": (["engine.backend=triton"], "engine.backend", {"TRITON_INTERPRET": None}),
    "context_too_long": (["task=synthetic", "task.context_tokens=4000", "task.max_new_tokens=200"], "model.max_context", {}),
    "missing_model_package": (["model=smollm2_135m", "model.package=not_a_pkg"], "model.package", {}),
    "unknown_key": (["method.no_such_key=3"], "method.no_such_key", {}),
    "prompt_too_long": (["task=longgenbench", "task.num_questions=30"], "model.max_context", {}),
    "gpu_pool": (["gpu_pool=sometimes"], "gpu_pool", {}),
    "model_dtype": (["model.dtype=float7"], "model.dtype=float7 is not supported (model=tiny_random)", {}),
    "last_task_choice": (["task=synthetic", "task=ppl", "task.max_new_tokens=8"],
                         "task.max_new_tokens is not a key of task=ppl", {}),
    "setting_names_group": (["method=quest", "method.budget.tokens=-3"], "method.budget.tokens must be", {}),
    "budget_mix": (["method.budget=0.1,64"], "method.budget=0.1,64", {}),
    "batch_size": (["engine.batch_size=0"], "engine.batch_size must be an integer >= 1 or auto", {}),
    "method_sweep_budget": (["-m", "method=full,quest", "method.budget.tokens=32"],
                            "method.budget.tokens does not apply to method=full", {}),
}  # fmt: skip


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path: Path) -> None:
    procs = {}
    for name, (overrides, _, env) in BAD_INPUTS.items():  # all at once: each start costs seconds of imports
        results = tmp_path / name
        procs[name] = subprocess.Popen(
            _cmd("run", "model=tiny_random", *overrides, f"results_dir={results}"),
            cwd=tmp_path,
            env=_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        key = BAD_INPUTS[name][1]
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], (name, err)
        results = tmp_path / name
        written = [p for p in results.rglob("*")] if results.exists() else []
        assert written == [], (name, written)


@pytest.mark.parametrize("case", ["under_a_file", "not_writable"])
def test_bad_results_dir_is_one_line_and_creates_nothing(tmp_path: Path, case: str) -> None:
    """A results folder that cannot be made or written stops before Hydra creates anything (its logs
    would go to <results_dir>/hydra/): one line naming results_dir, exit 2, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "res" if case == "under_a_file" else Path("/sys/retrobench-cannot-write/res")
    if case == "not_writable" and os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys is writable here")
    before = sorted(tmp_path.rglob("*"))
    proc = rb(tmp_path, "run", "model=tiny_random", f"results_dir={target}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: results_dir={target}") and "Traceback" not in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before and not target.exists()


def test_one_key_budgets_are_the_same_run_as_both_keys() -> None:
    """``method.budget=2048`` / ``=0.15`` and ``method.budget.tokens=48`` alone compose the config (and
    the run hash) of spelling both keys."""
    from hydra import compose, initialize_config_dir

    from retrobench import cli
    from retrobench.store import results

    def run_hash(overrides: list[str]) -> str:
        prepared, error = cli.prepare_run(["model=tiny_random", "method=quest", *overrides])
        assert error is None, error
        with initialize_config_dir(str(cli.conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=prepared)
        return results.run_hash(cfg), dict(cfg.method.budget)

    tokens = run_hash(["method.budget.tokens=2048", "method.budget.fraction=null"])
    assert tokens == run_hash(["method.budget=2048"]) == run_hash(["method.budget.tokens=2048"])
    assert tokens[1] == {"tokens": 2048, "fraction": None}
    fraction = run_hash(["method.budget.fraction=0.05", "method.budget.tokens=null"])
    assert fraction == run_hash(["method.budget=0.05"]) == run_hash(["method.budget.fraction=0.05"])
    assert cli.normalize_budget(["method.budget=0.05,0.15"])[0] == [
        "method.budget.fraction=0.05,0.15", "method.budget.tokens=null"]  # a sweep in one key  # fmt: skip


def test_list_help_and_hydra_flags(tmp_path: Path) -> None:
    listed = rb(tmp_path, "list")
    assert listed.returncode == 0
    for word in (
        "models:",
        "methods:",
        "tasks:",
        "experiments:",
        "sweeps:",
        "tiny_random",
        "full",
        "synthetic",
        "smoke",
    ):
        assert word in listed.stdout, word
    usage = rb(tmp_path, "--help")
    assert usage.returncode == 0 and "python -m retrobench run" in usage.stdout
    script = Path(sys.executable).parent / "retrobench"
    if script.exists():
        console = subprocess.run(
            [str(script), "--help"], check=False, capture_output=True, text=True, env=_env(), cwd=tmp_path
        )
        assert console.returncode == 0 and console.stdout == usage.stdout
    job = rb(tmp_path, "run", "--cfg", "job", "model=tiny_random", "experiment=smoke")
    assert job.returncode == 0, job.stderr
    assert "tiny_random" in job.stdout and "num_samples: 2" in job.stdout
    assert rb(tmp_path, "nope").returncode == 2


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``retrobench.cli.main(args)`` in this process: (exit code, stdout, stderr)."""
    from retrobench import cli

    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse's --help in a driver
        code = 0 if exc.code is None else int(exc.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_cli_runs_every_driver(tmp_path: Path, capsys) -> None:
    """``reproduce``, ``bench`` and ``study`` are subcommands of the one CLI (the ``python -m
    retrobench.<driver>`` spellings stay as aliases); each hands its arguments to the driver. Through
    ``cli.main`` in this process: ``python -m retrobench`` itself is started by the tests above (and
    ``retrobench.reproduce`` by test_experiments)."""
    code, usage, _ = _main(capsys, "--help")
    assert code == 0
    for command in ("run", "list", "report", "reproduce", "bench", "study"):
        assert f"\n  {command} " in usage, command
    code, _, err = _main(capsys, "reproduce", "--dry-run", "--profile", "tiny", "--results-dir", str(tmp_path / "r"))
    assert code == 0, err
    code, out, _ = _main(capsys, "bench", "--help")
    assert code == 0 and all(k in out for k in ("decode", "engine", "cli", "batch", "grader"))
    code, out, _ = _main(capsys, "bench", "decode", "--help")
    assert code == 0 and "--smoke" in out
    code, out, _ = _main(capsys, "study", "--help")
    assert code == 0 and all(s in out for s in ("mass", "retro", "table"))
    code, _, err = _main(capsys, "bench", "nope")
    assert code == 2 and "allowed: decode, engine, cli, batch, grader" in err


@pytest.mark.slow
def test_smoke_experiment_and_seed_sweep(tmp_path: Path) -> None:
    results = tmp_path / "res"
    smoke = rb(tmp_path, "run", "experiment=smoke", f"results_dir={results}")
    assert smoke.returncode == 0, smoke.stderr
    sweep = rb(tmp_path, "run", "experiment=smoke", "sweep=seeds", f"results_dir={results}")
    assert sweep.returncode == 0, sweep.stderr
    assert len(list((results / "runs").glob("*/metrics.json"))) == 3  # seed 0 was already done
