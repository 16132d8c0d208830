"""The reasoning task (retrobench.tasks.reasoning): sources, k samples, GPQA shuffling, scoring, bad input.

No network: local sources read JSONL fixtures written here; the hub path runs against a fake
``datasets`` module, and once against the real one with the hub forced offline.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict

import pytest
from conftest import conf_dir
from retrobench.conf import ConfigError
from retrobench.tasks.reasoning import BENCHMARKS, HUB, MATH_INSTRUCTION, ReasoningTask

GPQA_ROWS = [
    {
        "question": f"Which particle number {i}?",
        "choices": [f"right {i}", f"w1 {i}", f"w2 {i}", f"w3 {i}"],
        "answer": f"right {i}",
    }
    for i in range(8)
]
LOCAL = {
    "aime24": [{"question": f"AIME problem {i}", "answer": str(100 + i)} for i in range(10)],
    "math500": [
        {"question": "Half of one?", "answer": r"\frac{1}{2}"},
        {"question": "Root?", "answer": r"\sqrt{2}"},
    ],
    "gsm8k_cot": [
        {"question": "Apples?", "answer": "3 + 4 = 7\n#### 1,007"},
        {"question": "Pears?", "answer": "5"},
    ],
    "gpqa_diamond": GPQA_ROWS,
}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def local_task(tmp_path, benchmark, rows=None, **kw):
    path = write_jsonl(tmp_path / f"{benchmark}.jsonl", LOCAL[benchmark] if rows is None else rows)
    return ReasoningTask(benchmark=benchmark, source="local", path=path, **kw)


ANSWER_BENCHMARKS = [b for b in BENCHMARKS if b != "livecodebench"]  # its own tests: test_livecodebench.py


@pytest.mark.parametrize("benchmark", ANSWER_BENCHMARKS)
def test_local_source_loads(tmp_path, benchmark):
    samples = local_task(tmp_path, benchmark).samples(None, seed=0)
    assert len(samples) == len(LOCAL[benchmark])
    assert [s.meta["question_id"] for s in samples] == [f"{benchmark}-{i:04d}" for i in range(len(samples))]
    for s, row in zip(samples, LOCAL[benchmark]):
        assert s.prompt.startswith(row["question"]) and s.meta["benchmark"] == benchmark
        json.dumps(asdict(s))
        if benchmark == "gpqa_diamond":
            assert s.meta["choices"][("ABCD".index(s.reference))] == row["answer"]
            assert all(f"({c}) " in s.prompt for c in "ABCD")
        else:
            assert s.prompt.endswith(MATH_INSTRUCTION)
    if benchmark == "gsm8k_cot":
        assert [s.reference for s in samples] == ["1007", "5"]


def fake_datasets(rows, calls):
    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return list(rows)

    return types.SimpleNamespace(load_dataset=load_dataset)


HUB_ROWS = {
    "aime24": [{"id": 60, "problem": "Find n.", "answer": "204", "solution": "..."}],
    "math500": [{"problem": "Compute 1/2.", "answer": r"\frac12", "unique_id": "test/x/1.json"}],
    "gsm8k_cot": [{"question": "How many?", "answer": "2 * 3 = 6\n#### 6"}],
    "gpqa_diamond": [
        {
            "Question": " What is X? ",
            "Correct Answer": " yes\n",
            "Incorrect Answer 1": "no",
            "Incorrect Answer 2": "maybe",
            "Incorrect Answer 3": "never",
        }
    ],
}


@pytest.mark.parametrize("benchmark", ANSWER_BENCHMARKS)
def test_hub_source_with_fake_datasets(monkeypatch, benchmark):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(HUB_ROWS[benchmark], calls))
    (sample,) = ReasoningTask(benchmark=benchmark).samples(None, seed=0)
    hub_id, config, split, _, _ = HUB[benchmark]
    assert calls == [(hub_id, config, split)]
    expected = {"aime24": "204", "math500": r"\frac12", "gsm8k_cot": "6"}
    if benchmark == "gpqa_diamond":
        assert sample.prompt.startswith("What is X?")
        assert sample.meta["choices"]["ABCD".index(sample.reference)] == "yes"
        assert sorted(sample.meta["choices"]) == ["maybe", "never", "no", "yes"]
    else:
        assert sample.reference == expected[benchmark]


@pytest.mark.parametrize("benchmark", ["aime24", "gpqa_diamond"])
def test_hub_offline_fails_with_one_line(monkeypatch, benchmark):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import datasets.config as dconfig

        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if hasattr(dconfig, key):
                monkeypatch.setattr(dconfig, key, True)
    except ImportError:  # without `datasets` the message says to install it: still one line
        pass
    with pytest.raises(ConfigError) as info:
        ReasoningTask(benchmark=benchmark).samples(None, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and HUB[benchmark][0] in msg and "task.source=local" in msg


def test_samples_per_question_gives_k_distinct_ids(tmp_path):
    task = local_task(tmp_path, "math500", samples_per_question=4)
    samples = task.samples(None, seed=0)
    assert len(samples) == 2 * 4 and len({s.id for s in samples}) == 8
    first = samples[:4]
    assert [s.id for s in first] == [f"math500-0000#{j}" for j in range(4)]
    assert {s.prompt for s in first} == {first[0].prompt} and [s.meta["sample_index"] for s in first] == [
        0,
        1,
        2,
        3,
    ]
    from retrobench.runner.run import sample_seed

    assert len({sample_seed(0, s.id) for s in samples}) == 8  # the run layer's sampling seeds differ


def test_num_questions_is_a_seeded_subset(tmp_path):
    task = local_task(tmp_path, "aime24", num_questions=3)
    a, b, c = (task.samples(None, seed=s) for s in (0, 0, 1))
    assert [s.id for s in a] == [s.id for s in b] and len(a) == 3
    assert [s.id for s in a] != [s.id for s in c]
    assert len(local_task(tmp_path, "aime24").samples(None, 0)) == 10
    with pytest.raises(ConfigError, match=r"task\.num_questions=11 exceeds the 10"):
        local_task(tmp_path, "aime24", num_questions=11).samples(None, 0)


def test_gpqa_shuffle_deterministic_and_gold_correct(tmp_path):
    task = local_task(tmp_path, "gpqa_diamond", samples_per_question=2)
    a, b, c = (task.samples(None, seed=s) for s in (0, 0, 1))
    assert [(s.prompt, s.reference) for s in a] == [(s.prompt, s.reference) for s in b]
    assert [s.meta["choices"] for s in a] != [s.meta["choices"] for s in c]
    for s in a + c:
        i = int(s.meta["question_id"].rsplit("-", 1)[1])
        assert s.meta["choices"]["ABCD".index(s.reference)] == f"right {i}"
        assert f"({s.reference}) right {i}" in s.prompt
    assert a[0].meta["choices"] == a[1].meta["choices"]  # the k samples of a question share the order
    assert len({s.reference for s in a}) > 1  # the gold letter is not always the same


def test_gpqa_local_answer_as_letter(tmp_path):
    rows = [{"question": "Q?", "choices": ["p", "q", "r", "s"], "answer": "C", "id": "q1"}]
    (s,) = local_task(tmp_path, "gpqa_diamond", rows).samples(None, seed=3)
    assert s.id == "q1#0" and s.meta["choices"]["ABCD".index(s.reference)] == "r"


def test_score_math_and_gsm8k(tmp_path):
    s = local_task(tmp_path, "math500").samples(None, 0)[0]  # gold \frac{1}{2}
    task = ReasoningTask(benchmark="math500")
    assert task.score(s, r"... so it is $\boxed{0.5}$.") == {"accuracy": 1.0, "completion": 1.0}
    assert task.score(s, r"\boxed{\dfrac12}") == {"accuracy": 1.0, "completion": 1.0}
    assert task.score(s, r"\boxed{0.49}") == {"accuracy": 0.0, "completion": 1.0}
    assert task.score(s, "the answer is 0.5") == {"accuracy": 0.0, "completion": 0.0}  # no box
    assert task.score(s, r"<think>maybe \boxed{3}</think>Final: \boxed{1/2}")["accuracy"] == 1.0
    assert task.score(s, r"<think>cut off before \boxed{1/2}")["accuracy"] == 1.0
    g = local_task(tmp_path, "gsm8k_cot").samples(None, 0)[0]  # gold 1007
    gsm = ReasoningTask(benchmark="gsm8k_cot")
    assert gsm.score(g, "3 + 4 = 7, so 1,007 apples.")["accuracy"] == 1.0
    assert gsm.score(g, r"\boxed{1007} (not 12)")["accuracy"] == 1.0
    assert gsm.score(g, "The answer is 1006.") == {"accuracy": 0.0, "completion": 1.0}
    assert gsm.score(g, "no idea") == {"accuracy": 0.0, "completion": 0.0}


def test_score_gpqa(tmp_path):
    task = local_task(tmp_path, "gpqa_diamond")
    s = task.samples(None, 0)[0]
    wrong = next(c for c in "ABCD" if c != s.reference)
    assert task.score(s, f"Reasoning... The answer is ({s.reference}).")["accuracy"] == 1.0
    assert task.score(s, f"Answer: {wrong}") == {"accuracy": 0.0, "completion": 1.0}
    assert task.score(s, "I am not sure.") == {"accuracy": 0.0, "completion": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"benchmark": "humaneval"}, "task.benchmark"),
        ({"test_timeout_s": 0}, "task.test_timeout_s"),
        ({"start_date": "2024-02-30"}, "task.start_date"),
        ({"samples_per_question": 0}, "task.samples_per_question"),
        ({"samples_per_question": True}, "task.samples_per_question"),
        ({"num_questions": 0}, "task.num_questions"),
        ({"source": "s3"}, "task.source"),
        ({"source": "local"}, "task.path"),
        ({"path": "x.jsonl"}, "task.path"),
        ({"max_new_tokens": 0}, "task.max_new_tokens"),
        ({"chat_template": "yes"}, "task.chat_template"),
    ],
)
def test_invalid_settings(kwargs, key):
    with pytest.raises(ConfigError) as info:
        ReasoningTask(**kwargs)
    assert key in str(info.value) and "\n" not in str(info.value)
    if key == "task.benchmark":
        assert "aime24, gpqa_diamond, math500, gsm8k_cot" in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"question": "q"}\n', "lacks the field.*answer"),
        ("not json\n", "line 1 is not JSON"),
        (
            '{"question": "q", "answer": "1", "id": "a"}\n{"question": "r", "answer": "2", "id": "a"}\n',
            "duplicate id",
        ),
    ],
)
def test_bad_local_file(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        ReasoningTask(benchmark="aime24", source="local", path=str(path)).samples(None, 0)
    with pytest.raises(ConfigError, match=r"task\.path=.*is not a file"):
        ReasoningTask(benchmark="aime24", source="local", path=str(tmp_path / "missing.jsonl")).samples(
            None, 0
        )


def test_bad_gpqa_choices(tmp_path):
    rows = [{"question": "Q?", "choices": ["p", "q"], "answer": "p"}]
    with pytest.raises(ConfigError, match="choices must be a list of 4"):
        local_task(tmp_path, "gpqa_diamond", rows).samples(None, 0)
    rows = [{"question": "Q?", "choices": ["p", "q", "r", "s"], "answer": "z"}]
    with pytest.raises(ConfigError, match="neither an option"):
        local_task(tmp_path, "gpqa_diamond", rows).samples(None, 0)


def test_yaml_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir() / "task" / "reasoning.yaml")
    task = instantiate(cfg)
    assert isinstance(task, ReasoningTask) and task.chat_template and task.samples_per_question == 1
    settings = task.settings()
    assert settings["task"] == "reasoning" and settings["task_version"] == "1"
    assert set(settings) - {"task", "task_version"} == set(cfg) - {"_target_"}


def test_math_grader_setting_picks_the_comparison():
    """math-verify by default (the field's grader), our rules with task.math_grader=retrobench: the two
    differ on a percentage (tests/test_graders.py lists the disagreements)."""
    from retrobench.tasks.base import Sample

    sample = Sample("q#0", "p", "10", {"question_id": "q"})
    answer = r"so \boxed{10\%}"
    assert ReasoningTask(benchmark="math500").score(sample, answer)["accuracy"] == 0.0
    assert ReasoningTask(benchmark="math500", math_grader="retrobench").score(sample, answer)["accuracy"] == 1.0
    assert ReasoningTask(benchmark="math500").score(sample, r"\boxed{\frac{20}{2}}")["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="task.math_grader"):
        ReasoningTask(benchmark="math500", math_grader="sympy")
