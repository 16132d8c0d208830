"""The LongGenBench task (retrobench.tasks.longgenbench): prompts, scorer, sources, bad input.

No test touches the network: the local and hub sources read small fixtures written here, and the
real hub path runs with the hub switched off (it must fail with one line).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from conftest import conf_dir

from retrobench.inputs.models import ByteTokenizer
from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample
from retrobench.tasks.longgenbench import (
    LongGenBenchTask,
    extract_letter,
    extract_number,
    parse_answers,
    score_answers,
)
from retrobench.tasks.lib.longgenbench_data import CATEGORIES, choice_problem, gsm8k_problem

TOK = ByteTokenizer()
SHOTS = {"gsm8k": 8, "mmlu": 5, "csqa": 5}


def _questions(prompt: str) -> list[int]:
    return [int(k) for k in re.findall(r"^Question_(\d+):$", prompt, re.M)]


# ---- prompt construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["gsm8k", "mmlu", "csqa"])
@pytest.mark.parametrize("n", [15, 30, 45])
def test_prompt_construction(dataset, n):
    task = LongGenBenchTask(dataset=dataset, num_questions=n, num_samples=2)
    a, b = task.samples(TOK, 0), task.samples(TOK, 0)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.reference for s in a] == [s.reference for s in b]
    assert a[0].prompt != a[1].prompt and len({s.id for s in a}) == 2
    assert all(x.prompt != y.prompt for x, y in zip(a, task.samples(TOK, 1)))
    s, shots = a[0], SHOTS[dataset]
    assert task.num_shots == shots and task.max_new_tokens == 60 * n and task.chat_template
    assert _questions(s.prompt) == list(range(1, shots + n + 1))  # exemplars, then s+1 .. s+n
    assert [int(k) for k in re.findall(r"^Answer_(\d+):$", s.prompt, re.M)] == list(range(1, shots + 1))
    assert s.prompt.index(f"Answer_{shots}:") < s.prompt.index("Following Question:")
    assert s.prompt.index("Following Question:") < s.prompt.index(f"Question_{shots + 1}:")
    assert s.prompt.index("Examples:") < s.prompt.index("Question_1:")
    assert f"Answer all {n} questions" in s.prompt and "Answer_k:" in s.prompt
    assert len(s.reference) == n and s.meta["first_index"] == shots + 1
    assert s.prompt.count("The answer is") == shots + 1  # each exemplar + the instruction
    if dataset == "gsm8k":
        assert all(re.fullmatch(r"-?\d+", g) for g in s.reference)
        assert re.search(r"The answer is -?\d+\.\n", s.prompt)
    else:
        letters = "ABCD" if dataset == "mmlu" else "ABCDE"
        assert set(s.reference) <= set(letters)
        options = re.findall(r"^\(A\) .*$", s.prompt, re.M)
        assert len(options) == shots + n and all(f"({letters[-1]}) " in o for o in options)
        assert re.search(r"The answer is \([A-E]\)\.\n", s.prompt)
        assert ("multiple choice questions" in s.prompt) == (dataset == "mmlu")


def test_plain_prompt_ends_with_first_answer_tag():
    task = LongGenBenchTask(num_questions=3, num_samples=1, chat_template=False, num_shots=2)
    s = task.samples(TOK, 0)[0]
    assert s.prompt.endswith("\n\nAnswer_3:") and s.meta["answer_prefix"] == "Answer_3:"
    output = "\n".join(f"The answer is {g}.\nAnswer_{4 + i}:" for i, g in enumerate(s.reference))
    assert task.score(s, output)["accuracy"] == 1.0
    zero = LongGenBenchTask(num_questions=2, num_samples=1, num_shots=0).samples(TOK, 0)[0]
    assert "Examples:" not in zero.prompt and _questions(zero.prompt) == [1, 2]


def test_synthetic_answers_are_exact():
    rng = random.Random(0)
    for _ in range(300):
        item = gsm8k_problem(rng)
        assert extract_number(item.solution) == item.gold
        for letters in ("ABCD", "ABCDE"):
            mc = choice_problem(rng, letters)
            options = re.findall(r"\(([A-E])\) ", mc.text)
            assert "".join(options) == letters and extract_letter(mc.solution, letters) == mc.gold
    words = [w for ws in CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words))  # one right option per category question


# ---- the scorer ------------------------------------------------------------------------------------


def test_extract_number():
    cases = {
        "so 3 + 4 = 7.\nThe answer is 7.": "7",
        "The answer is 1,234.": "1234",
        "It costs $1,234.50 in all. The answer is $1,234.50": "1234.5",
        "The answer is 3.0.": "3",
        "12 - 30 = -18 degrees.\nThe answer is -18.": "-18",
        "The answer is \u22125": "-5",
        "The answer is 42. Checking: 40 + 2 = 42, and 7 more is 49.": "42",  # "answer is" preferred
        "5 * 4 = 20 computers; 9 + 20 = 29": "29",  # else the last number
        "21-15=6": "6",
        "#### 72": "72",
        "no digits here": None,
        "": None,
    }
    for text, expected in cases.items():
        assert extract_number(text) == expected, text


def test_extract_letter():
    cases = {
        "The capital is Cairo. The answer is (B).": "B",
        "Answer: C": "C",
        "the answer is D.": "D",
        "I pick (A) over (C)... (C)": "C",
        "C) because it is big": "C",
        "B.": "B",
        "E": None,  # not an MMLU option
        "A dog is an animal": None,  # the article is no answer
        "": None,
    }
    for text, expected in cases.items():
        assert extract_letter(text, "ABCD") == expected, text
    assert extract_letter("The answer is (E).", "ABCDE") == "E"


def test_parse_answers_by_index():
    text = "Answer_9:\nfoo 1\nAnswer_11: bar\n**Answer_10:** baz\nQuestion_12: repeated 5\nAnswer_9: again"
    assert parse_answers(text) == {9: "foo 1", 11: "bar", 10: "baz"}  # the first Answer_9 wins


GOLD = ["18", "-5", "1234", "7", "3"]  # questions 9..13


def _score(text):
    return score_answers(GOLD, text, 9, "gsm8k")


def test_score_perfect_and_out_of_order():
    blocks = [f"Answer_{9 + i}:\nsteps\nThe answer is {g}." for i, g in enumerate(GOLD)]
    assert _score("\n\n".join(blocks)) == {"accuracy": 1.0, "completion": 1.0, "answered": 5, "correct": 5}
    reordered = "\n\n".join(blocks[::-1])  # matched by index, never by position
    assert _score(reordered)["accuracy"] == 1.0


def test_score_skipped_repeated_formats_extra_and_cut():
    out = (
        "Answer_9:\n16 + 2 = 18.\nThe answer is 18.\n\n"
        # Answer_10 skipped
        "Answer_11:\nThat is $1,234 in total.\nThe answer is 1,234.\n\n"
        "Answer_12:\nThe answer is 6.\n\n"
        "Answer_12:\nThe answer is 7.\n\n"  # a repeat: the first one counts (wrong)
        "Answer_13:\nThe answer is 3.0.\n\n"
        "Answer_14:\nThe answer is 99.\n\nAnswer_8:\nThe answer is 1."  # outside 9..13: ignored
    )
    assert _score(out) == {"accuracy": 3 / 5, "completion": 4 / 5, "answered": 4, "correct": 3}
    negative = "Answer_10:\n10 - 15 = -5.\nThe answer is -5.\n"
    assert _score(negative)["correct"] == 1
    cut = "Answer_9:\nThe answer is 18.\n\nAnswer_10:\nThe answer is -5.\n\nAnswer_11:\nFirst, 1,0"
    got = _score(cut)  # cut off inside the third answer: the two answers present count
    assert got["correct"] == 2 and got["answered"] == 3 and got["accuracy"] == 2 / 5
    assert _score("I will not answer.") == {"accuracy": 0.0, "completion": 0.0, "answered": 0, "correct": 0}


def test_score_multiple_choice():
    gold = ["B", "E", "A"]
    out = "Answer_6:\nThink.\nThe answer is (B).\nAnswer_7: (E)\nAnswer_8:\nA dog. Hmm."
    got = score_answers(gold, out, 6, "csqa", "ABCDE")
    assert got == {"accuracy": 2 / 3, "completion": 2 / 3, "answered": 2, "correct": 2}
    task = LongGenBenchTask(dataset="mmlu", num_questions=2, num_samples=1)
    s = Sample("x", "p", ["C", "A"], {"dataset": "mmlu", "first_index": 6, "options": "ABCD"})
    assert task.score(s, "Answer_7: Answer: A\nAnswer_6: C)")["accuracy"] == 1.0


# ---- sources ---------------------------------------------------------------------------------------


def _scope_row(n: int, first: int = 3) -> dict:
    questions = [f"What is {i} + {i}?" for i in range(n)]
    prompt = "Examples: \nQuestion_1: \nWhat is 1 + 1?\n\nQuestion_2: \nWhat is 2 + 3?\n\n"
    prompt += "Answer_1:\n1 + 1 = 2.\nThe answer is 2.\n\nAnswer_2:\nThe answer is 5.\n\n"
    prompt += "Following Question: \n"
    prompt += "".join(f"Question_{first + i}:\n{q}\n" for i, q in enumerate(questions)) + "\n"
    answers = [f"{i} + {i}\n#### {2 * i:,}" for i in range(n)]  # GSM8K's gold format
    return {"prompt": prompt, "questions": questions, "answers": answers}


def test_local_source(tmp_path: Path):
    path = tmp_path / "gsm8k_30.jsonl"
    path.write_text("\n".join(json.dumps(_scope_row(30)) for _ in range(3)) + "\n")
    task = LongGenBenchTask(source="local", path=str(path), num_questions=15, num_samples=2)
    samples = task.samples(TOK, 0)
    s = samples[0]
    assert s.meta["first_index"] == 3 and s.reference == [str(2 * i) for i in range(15)]
    assert _questions(s.prompt)[-1] == 17 and "Question_18:" not in s.prompt  # first 15 kept
    assert s.prompt.startswith("Answer all 15 questions") and "Examples:" in s.prompt
    assert [x.prompt for x in samples] == [x.prompt for x in task.samples(TOK, 0)]
    out = "\n".join(f"Answer_{3 + i}:\nThe answer is {2 * i}." for i in range(15))
    assert task.score(s, out)["accuracy"] == 1.0
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(json.dumps({**_scope_row(20, 6), "answers": ["B"] * 20, "task": "high_school_biology"}))
    m = LongGenBenchTask(dataset="mmlu", source="local", path=str(mmlu), num_samples=1).samples(TOK, 0)[0]
    assert m.reference == ["B"] * 15 and m.meta["first_index"] == 6
    assert "about high school biology" in m.prompt
    with pytest.raises(ConfigError, match=r"task\.num_questions"):
        LongGenBenchTask(source="local", path=str(path), num_questions=45).samples(TOK, 0)
    with pytest.raises(ConfigError, match=r"task\.num_samples"):
        LongGenBenchTask(source="local", path=str(path), num_samples=4).samples(TOK, 0)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="lacks"):
        LongGenBenchTask(source="local", path=str(path)).samples(TOK, 0)


HUB_ROWS = {
    ("openai/gsm8k", "test"): [
        {"question": f"Q{i}: how many?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1:,}"}
        for i in range(990, 1040)
    ],
    ("openai/gsm8k", "train"): [
        {"question": f"T{i}?", "answer": f"so <<1+1=2>>2\n#### {i}"} for i in range(10)
    ],
    ("cais/mmlu", "test"): [
        {"question": f"M{i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
        for s in ("anatomy", "virology")
        for i in range(20)
    ],
    ("cais/mmlu", "dev"): [
        {"question": f"D{i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": 1}
        for s in ("anatomy", "virology")
        for i in range(5)
    ],
    ("tau/commonsense_qa", "validation"): [
        {"question": f"C{i}?", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "E"}
        for i in range(40)
    ],
    ("tau/commonsense_qa", "train"): [
        {"question": f"CT{i}?", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "A"}
        for i in range(10)
    ],
}


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return list(HUB_ROWS[(path, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_source_from_fixture(fake_hub):
    g = LongGenBenchTask(source="hub", num_questions=15, num_samples=2)
    a = g.samples(TOK, 0)
    assert ("openai/gsm8k", "main", "test") in fake_hub and ("openai/gsm8k", "main", "train") in fake_hub
    assert [s.prompt for s in a] == [s.prompt for s in g.samples(TOK, 0)]
    assert [s.prompt for s in a] != [s.prompt for s in g.samples(TOK, 1)]
    assert len({q for s in a for q in s.reference}) == 30  # disjoint questions across prompts
    assert all("," not in r for r in a[0].reference) and "<<" not in a[0].prompt
    assert re.search(r"so 2\nThe answer is \d\.", a[0].prompt) and a[0].prompt.count("T") >= 8
    m = LongGenBenchTask(dataset="mmlu", source="hub", num_questions=15, num_samples=2).samples(TOK, 0)
    assert {s.meta["subject"] for s in m} == {"anatomy", "virology"}
    assert "(A) w (B) x (C) y (D) z" in m[0].prompt and "The answer is (B)." in m[0].prompt
    assert set(m[0].reference) <= set("ABCD") and m[0].prompt.count("\nD") == 5
    c = LongGenBenchTask(dataset="csqa", source="hub", num_questions=15, num_samples=2).samples(TOK, 0)
    assert c[0].reference == ["E"] * 15 and "(E) z" in c[0].prompt and c[0].meta["first_index"] == 6
    with pytest.raises(ConfigError, match=r"task\.num_questions=30"):
        LongGenBenchTask(dataset="mmlu", source="hub", num_questions=30).samples(TOK, 0)
    with pytest.raises(ConfigError, match=r"task\.num_samples x task\.num_questions"):
        LongGenBenchTask(source="hub", num_questions=30, num_samples=2).samples(TOK, 0)


def test_hub_offline_fails_with_one_line(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, "1")
        monkeypatch.setattr(datasets.config, key, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for dataset, hub_id in (("gsm8k", "openai/gsm8k"), ("csqa", "tau/commonsense_qa")):
        with pytest.raises(ConfigError) as info:
            LongGenBenchTask(dataset=dataset, source="hub").samples(TOK, 0)
        message = str(info.value)
        assert "\n" not in message and hub_id in message and "task.source=local" in message


# ---- bad input and configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dataset": "math"}, "task.dataset"),
        ({"source": "web"}, "task.source"),
        ({"num_questions": 0}, "task.num_questions"),
        ({"num_shots": -1}, "task.num_shots"),
        ({"tokens_per_question": 0}, "task.tokens_per_question"),
        ({"num_samples": 0}, "task.num_samples"),
        ({"source": "local"}, "task.path"),
        ({"source": "local", "path": "/nonexistent/rows.jsonl"}, "task.path"),
    ],
)
def test_invalid_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        LongGenBenchTask(**kwargs)
    assert "\n" not in str(info.value)


def test_root_config_default_task_and_yaml():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_random"])
    task = instantiate(cfg.task, _convert_="all")
    assert isinstance(task, LongGenBenchTask)
    assert (task.dataset, task.source, task.num_questions) == ("gsm8k", "synthetic", 15)
    assert task.max_new_tokens == 900 and task.chat_template
    assert task.settings()["task"] == "longgenbench" and task.settings()["task_version"] == "1"


def test_default_fits_smollm2_context(smollm2_tokenizer):
    from omegaconf import OmegaConf

    from retrobench.runner.modes import encode_prompt

    limit = int(OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml").max_context)
    for dataset in ("gsm8k", "mmlu", "csqa"):
        for n in (15, 45):
            task = LongGenBenchTask(dataset=dataset, num_questions=n, num_samples=2)
            longest = max(len(encode_prompt(smollm2_tokenizer, s.prompt, True)) for s in task.samples(TOK, 0))
            assert longest + task.max_new_tokens < limit, (dataset, n, longest)
