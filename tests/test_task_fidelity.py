"""The fidelity task and its run mode on ``tiny_random``, wrapping the synthetic task.

Full attention teacher-forced along its own greedy output must score perfect fidelity (agreement
1, KL 0, output error 0, no divergence); Quest with a tiny budget must score below it; the
reference is computed once per sample and cached; the scorer's arithmetic is checked on hand-made
tensors; one CLI run checks metrics.json end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import model_conf, run_cli
from omegaconf import OmegaConf
from retrobench.methods.full import FullMethod
from retrobench.methods.quest import QuestMethod
from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample
from retrobench.tasks.fidelity import FidelityTask
from retrobench.tasks.synthetic import SyntheticTask

from retrobench.engine import Engine
from retrobench.runner.modes import RunContext, fidelity
from retrobench.runner.reference import ReferenceStore

SOURCE = {"context_tokens": 320, "num_queries": 2, "kind": "copy"}


def _task(**kw) -> FidelityTask:
    return FidelityTask(
        **{"source_task": "synthetic", "source_options": SOURCE, "max_new_tokens": 24, "probe_every": 2,
           "num_samples": 1, **kw}
    )  # fmt: skip


def _ctx(tiny_random, method, task: FidelityTask, results: Path) -> RunContext:
    model, tok = tiny_random
    return RunContext(
        model=model,
        tokenizer=tok,
        engine=Engine(model, method, page_size=16, probe_every=task.probe_every),
        task=task,
        store=ReferenceStore(results),
        model_identity=OmegaConf.to_container(model_conf("tiny_random")),
        eos=[tok.eos_token_id],
    )


def test_wraps_the_source_task(tiny_random) -> None:
    _, tok = tiny_random
    task = _task(num_samples=2)
    assert isinstance(task.wrapped, SyntheticTask) and task.wrapped.kind == "copy"
    assert task.wrapped.num_samples == 2 and task.context_tokens == 320 and task.stop == ["END"]
    inner = SyntheticTask(**SOURCE, num_samples=2).samples(tok, seed=3)
    assert [(s.id, s.prompt) for s in task.samples(tok, seed=3)] == [(s.id, s.prompt) for s in inner]
    assert task.settings()["source_settings"]["kind"] == "copy"


def test_full_attention_is_perfectly_faithful(tiny_random, tmp_path: Path) -> None:
    _, tok = tiny_random
    task = _task()
    (sample,) = task.samples(tok, seed=0)
    part = fidelity(_ctx(tiny_random, FullMethod(), task, tmp_path), sample, None)
    score, n = part["score"], part["new_tokens"]
    assert n >= 8, "the reference should be long enough to probe several steps"
    assert score["top1_agreement"] == 1.0 and score["first_divergence"] == n
    assert score["kl_full_method"] < 1e-9
    assert score["attn_out_rel_err"] < 1e-5 and abs(score["mass_recall"] - 1.0) < 1e-5
    layers = [k for k in score if k.startswith("mass_recall_layer_")]
    assert len(layers) == 4 and all(f"attn_out_rel_err_layer_{k.rsplit('_', 1)[1]}" in score for k in layers)
    assert score["completion"] == 1.0 and "accuracy" not in score
    assert len(part["probes"]) == len(range(0, n - 1, 2))  # decode steps 0, 2, 4, ... probed


def test_tiny_budget_scores_below_full_and_reuses_the_reference(tiny_random, tmp_path: Path) -> None:
    _, tok = tiny_random
    task = _task()
    (sample,) = task.samples(tok, seed=0)
    full = fidelity(_ctx(tiny_random, FullMethod(), task, tmp_path), sample, None)
    ctx = _ctx(tiny_random, QuestMethod(budget={"tokens": 16, "fraction": None}), task, tmp_path)
    part = fidelity(ctx, sample, None)
    assert part["reference_cached"] and not full["reference_cached"] and ctx.store.hits == 1
    assert ctx._full is None and len(list((tmp_path / "reference").glob("fidelity-*.pt"))) == 1
    score = part["score"]
    assert score["top1_agreement"] < 1.0 or score["kl_full_method"] > 1e-6
    assert score["mass_recall"] < 0.99 and score["attn_out_rel_err"] > 1e-3
    assert "mass_recall_layer_0" not in score and "mass_recall_layer_2" in score  # layers 0-1 stay dense
    assert part["new_tokens"] == full["new_tokens"] and part["output"] == full["output"]
    stored = torch.load(next((tmp_path / "reference").glob("fidelity-*.pt")), weights_only=True)
    assert stored["logits"].dtype == torch.float16 and stored["logits"].shape[0] == full["new_tokens"]


def test_score_fidelity_arithmetic() -> None:
    task = _task()
    sample = Sample(id="x", prompt="", reference=None)
    ref_logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    ref_tokens = [0, 1, 2, 0]
    other = ref_logits.clone()
    other[2] = torch.tensor([0.0, 4.0, 0.0])  # diverges at position 2 only
    probes = [
        {"step": 0, "recall": {"2": 0.5, "3": 1.0}, "out_error": {"2": 0.2, "3": 0.0}},
        {"step": 2, "recall": {2: 0.7}, "out_error": {2: 0.4}},
    ]
    score = task.score_fidelity(sample, ref_tokens, ref_logits.half(), other, probes)
    assert score["top1_agreement"] == 0.75 and score["first_divergence"] == 2 and score["tokens"] == 4
    lp = torch.log_softmax(ref_logits[2].double(), -1)
    lq = torch.log_softmax(other[2].double(), -1)
    assert abs(score["kl_full_method"] - float((lp.exp() * (lp - lq)).sum()) / 4) < 1e-12
    assert abs(score["mass_recall"] - (0.5 + 1.0 + 0.7) / 3) < 1e-12
    assert abs(score["mass_recall_layer_2"] - 0.6) < 1e-12 and score["mass_recall_layer_3"] == 1.0
    assert abs(score["attn_out_rel_err_layer_2"] - 0.3) < 1e-12
    no_probes = task.score_fidelity(sample, ref_tokens, ref_logits, ref_logits, [])
    assert no_probes["kl_full_method"] == 0.0 and "mass_recall" not in no_probes
    assert no_probes["first_divergence"] == 4
    with pytest.raises(ValueError):
        task.score_fidelity(sample, ref_tokens, ref_logits, other[:3], [])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_task": "ppl"}, r"task\.source_task=ppl is not a generating task; allowed: .*synthetic"),
        ({"source_task": "nope"}, r"task\.source_task=nope"),
        ({"source_options": {"bogus": 1}}, r"task\.source_options\.bogus is not a setting of task synthetic"),
        ({"source_options": {"kind": "dance"}}, r"task\.source_options\.kind='dance'"),
        ({"probe_every": 0}, r"task\.probe_every"),
        ({"stop": ["x"]}, r"task\.source_options\.stop"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _task(**kwargs)


def test_null_source_options_mean_defaults() -> None:
    task = FidelityTask(source_task="synthetic", source_options=None, num_samples=3)
    assert task.source_options == {} and task.wrapped.num_samples == 3


def test_cli_fidelity_run_writes_metrics(tmp_path: Path) -> None:
    record, results = run_cli(
        tmp_path, "model=tiny_random", "method=quest", "task=fidelity", "task.source_task=synthetic",
        "task.source_options={context_tokens: 320, num_queries: 2, kind: copy}", "task.max_new_tokens=16",
        "task.probe_every=4", "task.num_samples=1",
    )  # fmt: skip
    m = record["metrics"]
    assert record["task"] == "fidelity" and record["task_version"] == "1" and m["n"] == 1
    for key in ("top1_agreement", "kl_full_method", "first_divergence", "attn_out_rel_err", "mass_recall",
                "mass_recall_layer_2", "attn_out_rel_err_layer_3"):  # fmt: skip
        assert isinstance(m[key], float), key
    assert m["accuracy"] is None and record["task_settings"]["source_settings"]["kind"] == "copy"
    assert len(list((results / "reference").glob("fidelity-*.pt"))) == 1
