"""The result store and metric aggregation: run hashes, truncated-line repair, tidy frames."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from retrobench.store import load_runs, load_samples, results
from retrobench.cli import conf_dir
from retrobench.kernels.ops import PREFILL_CHUNK
from retrobench.store.metrics import aggregate, bootstrap_ci, summarize


def _cfg(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=["model=tiny_random", *overrides])


def test_hash_is_stable_and_ignores_non_semantic_keys() -> None:
    base = results.run_hash(_cfg())
    assert len(base) == 12 and int(base, 16) >= 0
    assert results.run_hash(_cfg()) == base
    for same in ("logger=wandb", "results_dir=/elsewhere", "overwrite=true", "engine.batch_size=8",
                 "engine.backend=torch"):  # fmt: skip
        assert results.run_hash(_cfg(same)) == base, same  # backend=auto on CPU hashes as torch
    torch_hash = results.run_hash(_cfg("engine.backend=torch", "device=cuda", "engine.prefill_chunk=512"))
    assert torch_hash == base  # the device alone never changes the hash; auto settings hash as what they pick:
    assert results.run_hash(_cfg("engine.prefill_chunk=512")) == base  # prefill_chunk=auto is 512 on CPU
    assert results.run_hash(_cfg("engine.backend=torch", "device=cuda")) == results.run_hash(
        _cfg("engine.backend=torch", "device=cuda", f"engine.prefill_chunk={PREFILL_CHUNK['cuda']}"))  # GPU's  # fmt: skip
    assert results.run_hash(_cfg("engine.compile=true")) == base  # compiled layers: speed, not results
    # engine.backend=auto on a GPU is the triton backend: the same folder as asking for triton there
    triton = results.run_hash(_cfg("engine.backend=triton", "device=cuda"))
    auto = results.run_hash(_cfg("device=cuda"))
    assert triton != base and (auto == triton) == (importlib.util.find_spec("triton") is not None)
    for different in (
        "seed=1",
        "engine.page_size=32",
        "method.dense_layers=2",
        "task.num_samples=9",
        "model=smollm2_135m",
    ):
        assert results.run_hash(_cfg(different)) != base, different
    assert results.run_dir(_cfg("results_dir=/r")) == Path("/r/runs") / base


def test_truncated_last_line_is_dropped_and_file_repaired(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    results.append_sample(path, {"id": "a", "x": 1})
    results.append_sample(path, {"id": "b", "x": 2})
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')
    rows = results.read_samples(path)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 2
    results.append_sample(path, {"id": "c", "x": 3})
    assert [r["id"] for r in results.read_samples(path)] == ["a", "b", "c"]
    with open(path, "a") as f:  # broken JSON on a full line and a duplicate id
        f.write('{"id": \n{"id": "a", "x": 9}\n')
    assert [r["x"] for r in results.read_samples(path)] == [1, 2, 3]
    assert results.read_samples(tmp_path / "missing.jsonl") == []


def test_summaries_and_bootstrap() -> None:
    s = summarize([1, 2, 3, 4, None, float("nan")])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["p50"] == 2.5
    low, high = bootstrap_ci([0, 1] * 20, seed=0)
    assert 0.3 < low < 0.5 < high < 0.7
    assert bootstrap_ci([0, 1] * 20, seed=0) == (low, high)
    assert summarize([])["n"] == 0


def _row(i: int, acc: float) -> dict:
    return {
        "id": f"s{i}",
        "score": {"accuracy": acc, "completion": 1.0},
        "ttft_s": 0.1,
        "new_tokens": 3,
        "step_times_s": [0.01, 0.02],
        "stats": {"attended_kv": 10.0, "resident_kv": 10.0, "peak_memory_bytes": 5.0},
        "wall_s": 1.0,
    }


def test_aggregate_and_load_runs(tmp_path: Path) -> None:
    agg = aggregate([_row(0, 1.0), _row(1, 0.0)])
    m = agg["metrics"]
    assert m["n"] == 2 and m["accuracy"] == 0.5 and m["completion"] == 1.0 and m["tpot_p50_s"] == 0.015
    assert m["exposure"] is None and m["wall_time_s"] == 2.0 and "ci_low" in agg["summaries"]["accuracy"]
    folder = tmp_path / "runs" / "abcdef012345"
    folder.mkdir(parents=True)
    record = {
        "run": folder.name,
        "method": "full",
        "method_settings": {"method": "full", "dense_layers": 0},
        "task": "synthetic",
        "task_version": "1",
        "model": "tiny_random",
        "seed": 0,
        "backend": "torch",
        **agg,
    }
    results.write_json(folder / "metrics.json", record)
    results.write_env(folder, "torch", "cpu")
    for i, acc in enumerate([1.0, 0.0]):
        results.append_sample(folder / "samples.jsonl", _row(i, acc))
    frame = load_runs(tmp_path)
    for col in (
        "run",
        "method",
        "dense_layers",
        "task",
        "task_version",
        "model",
        "seed",
        "backend",
        "env.git_sha",
        "env.torch",
    ):
        assert col in frame.columns, col
    assert len(frame) == 1 and frame.attrs["metrics"] == list(m)
    assert frame.loc[0, "accuracy"] == 0.5
    samples = load_samples(tmp_path)
    assert len(samples) == 2 and "accuracy" in samples.columns
    assert load_runs(tmp_path / "empty").empty
    env = json.loads((folder / "env.json").read_text())
    assert env["backend"] == "torch" and env["device"] == "cpu"
