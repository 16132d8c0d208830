"""The ppl task and its teacher-forced run mode on ``tiny_random``.

Teacher-forced NLL through the engine's decode path with full attention must equal the NLL of one
dense forward pass of the model (standard attention) over the same tokens; buckets partition the
scored tokens; the full-attention reference is computed once and then read from the result store;
the sources (stdlib, file, pg19 offline) behave. One CLI run checks metrics.json end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import model_conf, run_cli
from retrobench.methods.full import FullMethod
from retrobench.methods.quest import QuestMethod
from retrobench.conf import ConfigError
from retrobench.tasks.ppl import PerplexityTask

from retrobench.engine import Engine
from retrobench.store.metrics import token_nll
from retrobench.runner.modes import RunContext, teacher_forced
from retrobench.runner.reference import ReferenceStore


def _ctx(tiny_random, method, results: Path, task: PerplexityTask) -> RunContext:
    model, tok = tiny_random
    from omegaconf import OmegaConf

    return RunContext(
        model=model,
        tokenizer=tok,
        engine=Engine(model, method, page_size=16, prefill_chunk=128),
        task=task,
        store=ReferenceStore(results),
        model_identity=OmegaConf.to_container(model_conf("tiny_random")),
    )


def _task(**kw) -> PerplexityTask:
    return PerplexityTask(
        **{"context_tokens": 300, "eval_tokens": 100, "bucket_tokens": 32, "num_samples": 1, **kw}
    )


def test_full_teacher_forced_nll_equals_one_dense_forward(tiny_random, tmp_path: Path) -> None:
    model, tok = tiny_random
    task = _task()
    (sample,) = task.samples(tok, seed=0)
    prompt, target = sample.meta["prompt_ids"], sample.meta["target_ids"]
    assert len(prompt) == 300 and len(target) == 100 and prompt[0] == tok.bos_token_id

    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # the model's own (standard) attention, one pass
    dense = token_nll(logits[len(prompt) - 1 : -1], target)

    gen = Engine(model, FullMethod(), page_size=16, prefill_chunk=128).generate(
        prompt, 0, teacher_tokens=target, keep_logits=True
    )
    engine_nll = token_nll(gen.logits, target)
    torch.testing.assert_close(engine_nll, dense, rtol=1e-4, atol=1e-6)

    part = teacher_forced(_ctx(tiny_random, FullMethod(), tmp_path, task), sample, None)
    score = part["score"]
    assert math.isclose(score["nll"], float(dense.mean()), rel_tol=1e-4)
    assert math.isclose(score["ppl"], math.exp(score["nll"]), rel_tol=1e-12)
    assert score["ppl_ratio"] == 1.0 and score["completion"] == 1.0 and "accuracy" not in score
    assert all(score[f"nll_ratio_bucket_{i}"] == 1.0 for i in range(4))
    assert part["new_tokens"] == 100 and part["prompt_tokens"] == 300 and part["finish_reason"] == "teacher"


def test_buckets_partition_the_eval_tokens() -> None:
    task = _task()
    bounds = task.bucket_bounds()
    assert bounds == [(0, 32), (32, 64), (64, 96), (96, 100)]
    nll = [0.01 * i for i in range(100)]
    score = task.score_nll(None, nll, [0.5] * 100)  # type: ignore[arg-type]
    buckets = [score[f"nll_bucket_{i}"] for i in range(len(bounds))]
    assert f"nll_bucket_{len(bounds)}" not in score
    weighted = sum(b * (e - s) for b, (s, e) in zip(buckets, bounds)) / 100
    assert math.isclose(weighted, score["nll"], rel_tol=1e-12)
    assert math.isclose(buckets[0], sum(nll[:32]) / 32)
    assert math.isclose(score["nll_ratio_bucket_3"], math.exp(buckets[3] - 0.5))
    assert math.isclose(score["ppl_ratio"], math.exp(score["nll"] - 0.5))
    assert task.bucket_bounds(5) == [(0, 5)]


def test_full_reference_is_cached_once_and_reused(tiny_random, tmp_path: Path) -> None:
    _, tok = tiny_random
    task = _task(eval_tokens=48)
    (sample,) = task.samples(tok, seed=0)
    quest = lambda: QuestMethod(budget={"tokens": 32, "fraction": None})

    first_ctx = _ctx(tiny_random, quest(), tmp_path, task)
    first = teacher_forced(first_ctx, sample, None)
    files = list((tmp_path / "reference").glob("ppl-*.pt"))
    assert len(files) == 1 and not first["reference_cached"] and first_ctx.store.misses == 1
    mtime = files[0].stat().st_mtime_ns
    stored = torch.load(files[0], weights_only=True)
    assert stored["tokens"].tolist() == sample.meta["target_ids"] and stored["nll"].dtype == torch.float64

    second_ctx = _ctx(tiny_random, quest(), tmp_path, task)
    second = teacher_forced(second_ctx, sample, None)
    assert second["reference_cached"] and second_ctx.store.hits == 1 and second_ctx.store.misses == 0
    assert second_ctx._full is None  # the full-attention engine was never built
    assert files[0].stat().st_mtime_ns == mtime and len(list((tmp_path / "reference").glob("*.pt"))) == 1
    assert second["score"] == first["score"] and first["score"]["ppl_ratio"] != 1.0

    full = teacher_forced(_ctx(tiny_random, FullMethod(), tmp_path, task), sample, None)  # reads the cache
    assert full["reference_cached"] and full["score"]["ppl_ratio"] == 1.0
    assert full["score"]["nll"] == first["score"]["nll_full"]


def test_file_source_reads_consecutive_windows(tiny_random, tmp_path: Path) -> None:
    _, tok = tiny_random
    text = " ".join(f"line {i} of a small local text file." for i in range(200))
    path = tmp_path / "book.txt"
    path.write_text(text)
    task = PerplexityTask(source="file", path=str(path), context_tokens=65, eval_tokens=16, num_samples=3)
    samples = task.samples(tok, seed=5)
    raw = tok.encode(text, add_special_tokens=False)
    assert [s.id for s in samples] == ["ppl-file-0", "ppl-file-1", "ppl-file-2"]
    for i, s in enumerate(samples):
        start = i * 80
        assert s.meta["prompt_ids"] == [tok.bos_token_id, *raw[start : start + 64]]
        assert s.meta["target_ids"] == raw[start + 64 : start + 80]
    assert [s.meta for s in task.samples(tok, seed=0)] == [s.meta for s in samples]  # seed-independent

    with pytest.raises(ConfigError, match="has only"):
        PerplexityTask(source="file", path=str(path), context_tokens=4000, eval_tokens=16).samples(tok, 0)
    with pytest.raises(ConfigError, match="task.path"):
        PerplexityTask(source="file", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="task.path"):
        PerplexityTask(source="file")


def test_stdlib_source_is_the_default(tiny_random) -> None:
    _, tok = tiny_random
    task = _task(num_samples=2)
    a, b = task.samples(tok, seed=0)
    assert task.source == "stdlib" and a.id != b.id and a.meta["target_ids"] != b.meta["target_ids"]
    assert len(b.meta["prompt_ids"]) == 300 and len(b.meta["target_ids"]) == 100


def test_pg19_offline_fails_with_one_line(tiny_random, monkeypatch: pytest.MonkeyPatch) -> None:
    _, tok = tiny_random
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = PerplexityTask(source="pg19", context_tokens=64, eval_tokens=16, num_samples=1)
    with pytest.raises(ConfigError) as info:
        task.samples(tok, seed=0)
    message = str(info.value)
    assert "\n" not in message and "deepmind/pg19" in message and "source: file" in message


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"source": "web"}, "task.source"),
        ({"eval_tokens": 0}, "task.eval_tokens"),
        ({"bucket_tokens": 1.5}, "task.bucket_tokens"),
        ({"chat_template": True}, "task.chat_template"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PerplexityTask(**kwargs)


def test_max_new_tokens_follows_eval_tokens() -> None:
    assert PerplexityTask(eval_tokens=77).max_new_tokens == 77


def test_cli_ppl_run_writes_metrics(tmp_path: Path) -> None:
    record, results = run_cli(
        tmp_path, "model=tiny_random", "method=quest", "task=ppl", "task.context_tokens=200",
        "task.eval_tokens=64", "task.bucket_tokens=32", "task.num_samples=1",
    )  # fmt: skip
    m = record["metrics"]
    assert record["task"] == "ppl" and record["task_version"] == "1" and m["n"] == 1
    for key in ("nll", "ppl", "ppl_ratio", "nll_full", "nll_bucket_0", "nll_bucket_1", "nll_ratio_bucket_1"):
        assert isinstance(m[key], float), key
    assert m["accuracy"] is None and m["completion"] == 1.0 and "ci_low" in record["summaries"]["nll"]
    assert len(list((results / "reference").glob("ppl-*.pt"))) == 1
    (samples_file,) = (results / "runs").glob("*/samples.jsonl")
    row = json.loads(samples_file.read_text().splitlines()[0])
    assert row["new_tokens"] == 64 and row["reference_cached"] is False and row["task_version"] == "1"


def test_first_window_skips_windows_and_keeps_absolute_ids(tiny_random) -> None:
    _, tok = tiny_random
    both = _task(num_samples=2).samples(tok, seed=0)
    (second,) = _task(num_samples=1, first_window=1).samples(tok, seed=3)
    assert second.id == both[1].id == "ppl-stdlib-1"
    assert second.meta == both[1].meta and second.reference == both[1].reference
    with pytest.raises(ConfigError, match="task.first_window"):
        _task(first_window=-1)
