"""The synthetic task (retrobench.tasks.synthetic): determinism, length control, scoring, bad input."""

from __future__ import annotations

import pytest
from conftest import conf_dir

from retrobench.inputs.models import ByteTokenizer
from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample
from retrobench.tasks.synthetic import SyntheticTask, score_retrieval


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


@pytest.mark.parametrize("kind", ["retrieval", "copy"])
def test_samples_are_deterministic_per_seed(byte_tok, kind):
    task = SyntheticTask(kind=kind, num_samples=3, context_tokens=600)
    a, b = task.samples(byte_tok, seed=0), task.samples(byte_tok, seed=0)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.reference for s in a] == [s.reference for s in b]
    assert len({s.id for s in a}) == 3 and len({s.prompt for s in a}) == 3  # samples differ
    c = task.samples(byte_tok, seed=1)
    assert all(x.prompt != y.prompt for x, y in zip(a, c))


@pytest.mark.parametrize("kind", ["retrieval", "copy"])
@pytest.mark.parametrize("target", [512, 2000])
def test_prompt_length_byte_tokenizer(byte_tok, kind, target):
    for sample in SyntheticTask(kind=kind, num_samples=2, context_tokens=target).samples(byte_tok, 0):
        n = len(byte_tok.encode(sample.prompt))
        assert n == sample.meta["prompt_tokens"]
        assert target <= n <= 1.1 * target


@pytest.mark.parametrize("kind", ["retrieval", "copy"])
@pytest.mark.parametrize("target", [256, 1024, 4096])
def test_prompt_length_smollm2_tokenizer(smollm2_tokenizer, kind, target):
    tok = smollm2_tokenizer
    task = SyntheticTask(kind=kind, num_samples=2, context_tokens=target, num_queries=4)
    for sample in task.samples(tok, 0):
        n = len(tok.encode(sample.prompt))
        assert target <= n <= 1.1 * target


def test_retrieval_prompt_shape(byte_tok):
    sample = SyntheticTask(num_samples=1, num_queries=5, context_tokens=800).samples(byte_tok, 0)[0]
    keys = [k for k, _ in sample.reference]
    assert len(keys) == len(set(keys)) == 5
    for key, value in sample.reference:
        assert f"key {key}: value {value}\n" in sample.prompt
    assert sample.prompt.endswith(f"key {keys[0]}:")  # the model starts on the first answer
    assert sample.meta["answer_prefix"] == f"key {keys[0]}:"
    chat = SyntheticTask(num_samples=1, num_queries=5, context_tokens=800, chat_template=True)
    assert chat.samples(byte_tok, 0)[0].meta["answer_prefix"] == ""


def _answer(reference, skip=(), order=None):
    pairs = [reference[i] for i in (order or range(len(reference)))]
    return "\n".join(f"key {k}: {v}" for i, (k, v) in enumerate(pairs) if i not in skip) + "\nEND"


@pytest.fixture(scope="module")
def retrieval():
    task = SyntheticTask(num_samples=1, num_queries=4, context_tokens=600)
    return task, task.samples(ByteTokenizer(), 0)[0]


def test_score_retrieval(retrieval):
    task, s = retrieval
    ref = s.reference
    full = _answer(ref)
    prefix = s.meta["answer_prefix"]
    output = full[len(prefix) :]  # the model continues after the prompt's "key N:" prefix
    assert task.score(s, output) == {"accuracy": 1.0, "completion": 1.0}
    skipped = _answer(ref, skip={2})[len(prefix) :]
    assert task.score(s, skipped) == {"accuracy": 0.75, "completion": 0.75}
    reordered = f" {ref[0][1]}\n" + _answer(ref, order=[3, 1, 2])  # the first, then the rest reversed
    assert task.score(s, reordered) == {"accuracy": 1.0, "completion": 1.0}  # by key, not position
    shuffled = score_retrieval([tuple(p) for p in ref], "junk\n" + _answer(ref, order=[3, 1, 2, 0]))
    assert shuffled == {"accuracy": 1.0, "completion": 1.0}
    wrong = task.score(s, " not-it\n" + _answer(ref)[len(f"key {ref[0][0]}: {ref[0][1]}\n") :])
    assert wrong == {"accuracy": 0.75, "completion": 1.0}
    garbage = " I do not know. Here is a poem about the sea."
    assert task.score(s, garbage) == {"accuracy": 0.0, "completion": 0.0}
    cut = task.score(s, output[: len(output) // 2])
    assert cut["completion"] < 1.0 and cut["accuracy"] <= cut["completion"]


def test_score_copy(byte_tok):
    task = SyntheticTask(kind="copy", num_samples=1, context_tokens=400)
    s = task.samples(byte_tok, 0)[0]
    lines = list(s.reference)
    prefix = s.meta["answer_prefix"]  # the prompt ends with the passage's first word
    assert len(lines) >= 4 and prefix == lines[0].split()[0] and s.prompt.endswith(prefix)

    def output(text: str) -> str:  # what the model generates after the prompt
        assert text.startswith(prefix)
        return text[len(prefix) :]

    assert task.score(s, output("\n".join(lines) + "\nEND")) == {"accuracy": 1.0, "completion": 1.0}
    assert task.score(s, output("\n".join(x.replace(" ", "  ") for x in lines)))["accuracy"] == 1.0
    cut = task.score(s, output("\n".join(lines[:2])))
    assert cut == {"accuracy": 2 / len(lines), "completion": 2 / len(lines)}
    one_wrong = output(lines[0]) + "\nwrong line\n" + "\n".join(lines[2:])
    assert task.score(s, one_wrong)["accuracy"] == 1 - 1 / len(lines)
    assert task.score(s, " garbage words\n" * len(lines))["accuracy"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "sorting"}, "task.kind"),
        ({"context_tokens": 8}, "task.context_tokens"),
        ({"num_queries": 0}, "task.num_queries"),
        ({"num_samples": 0}, "task.num_samples"),
        ({"max_new_tokens": 0}, "task.max_new_tokens"),
    ],
)
def test_invalid_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        SyntheticTask(**kwargs)
    assert "\n" not in str(info.value)
    if key == "task.kind":
        assert "retrieval, copy" in str(info.value)


def test_context_too_small_for_queries(byte_tok):
    with pytest.raises(ConfigError, match=r"task\.context_tokens"):
        SyntheticTask(context_tokens=64, num_queries=8).samples(byte_tok, 0)


def test_yaml_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir() / "task" / "synthetic.yaml")
    task = instantiate(cfg)
    assert isinstance(task, SyntheticTask) and task.stop == ["END"]
    assert task.settings()["task_version"] == "1"
    fields = set(task.settings()) - {"task", "task_version"}
    assert fields == set(cfg) - {"_target_"}


def test_sample_is_json_serialisable(byte_tok):
    import json
    from dataclasses import asdict

    for kind in ("retrieval", "copy"):
        s = SyntheticTask(kind=kind, num_samples=1).samples(byte_tok, 0)[0]
        assert isinstance(s, Sample)
        json.dumps(asdict(s))
