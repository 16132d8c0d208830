"""Long chain-of-thought reasoning benchmarks with proper answer graders and pass@1 over k samples.

Why: decode-time KV selection matters most when the output is long; reasoning traces of thousands
of tokens are where a method that drops the wrong keys loses accuracy. Benchmarks
(``task.benchmark``):

- ``aime24``: AIME 2024, 30 problems, integer answers (``HuggingFaceH4/aime_2024``, split train).
- ``math500``: the MATH-500 subset (``HuggingFaceH4/MATH-500``, split test), LaTeX answers.
- ``gsm8k_cot``: GSM8K test (``openai/gsm8k`` config main), gold after ``####``.
- ``gpqa_diamond``: GPQA-Diamond (``Idavidrein/gpqa`` config gpqa_diamond, split train; a gated
  dataset: accept its terms on the hub and log in once). The four options are shuffled per
  question by ``(seed, question id)``, identically for all k samples, and the gold letter recorded.

Math prompts end with the R1-style instruction "Please reason step by step, and put your final
answer within \\boxed{}."; GPQA lists the options (A)-(D) and asks for "The answer is (X)". Graders
are in :mod:`retrobench.tasks.graders` (math: the last ``\\boxed{}``, compared by
:func:`math_verify_equal` (``task.math_grader=math_verify``, default) or :func:`math_equal`
(``retrobench``); GSM8K: boxed else :func:`extract_final_number`, then the same comparison; GPQA:
:func:`extract_choice`). Text after a ``</think>`` tag is
graded when present (reasoning models), else the whole output.

pass@1: ``samples()`` returns every question ``samples_per_question`` (k) times, with ids
``<qid>#<j>``; the run layer derives each sample's sampling seed from the run seed and the id, so
the k samples differ only when sampling is on (``engine.temperature > 0``; at temperature 0 all k
are the same greedy output). ``score()`` gives 0/1 ``accuracy`` per sample, so the mean accuracy
over all samples of a run IS pass@1 averaged over k (every question has exactly k samples).
Paper-like setting: ``engine.temperature=0.6 engine.top_p=0.95 task.samples_per_question=4``.

Sources: ``hub`` (through ``datasets``, imported lazily; offline or missing it fails with one
line naming the dataset id) or ``local``: a JSONL file (``task.path``) with ``question`` and
``answer`` per line (GSM8K answers may keep the ``#### n`` form), plus ``choices`` (list of option
texts; ``answer`` is the correct option's text or its letter) for gpqa_diamond, and an optional
``id``. ``num_questions`` takes the first N questions of a seed-shuffled order (null: all, in
file order), so different run seeds see different subsets when N is set.

``num_samples`` of the base task is not used: a run has num_questions x samples_per_question
samples.

- ``livecodebench``: LiveCodeBench code generation (:mod:`retrobench.tasks.lib.livecodebench`):
  ``task.version_tag`` and the date window ``task.start_date`` / ``task.end_date`` pick the problems
  (v5's by default), each candidate program is graded in a sandbox
  (:mod:`retrobench.tasks.lib.sandbox`; ``task.test_timeout_s``, ``task.problem_timeout_s``,
  ``task.memory_mb``). Its scoring runs programs, so the run layer grades its samples in background
  threads (``background_scoring``) while the GPU decodes the next ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from retrobench.tasks.lib import livecodebench as lcb
from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample, Task, TextTokenizer
from retrobench.tasks.graders import (
    extract_boxed,
    extract_choice,
    extract_final_number,
    math_equal,
    math_verify_equal,
)

BENCHMARKS = ("aime24", "gpqa_diamond", "math500", "gsm8k_cot", "livecodebench")
#: Questions of each benchmark's hub split (``num_questions: null`` runs all of them); LiveCodeBench's
#: depends on the release and window: 279 is an estimate of v5's 2024-08..2025-01 window, for planning only.
HUB_SIZES = {"aime24": 30, "gpqa_diamond": 198, "math500": 500, "gsm8k_cot": 1319, "livecodebench": 279}
SOURCES = ("hub", "local")
#: Math answer graders: math-verify (the field's library), or retrobench's own rules (graders.py).
MATH_GRADERS = ("math_verify", "retrobench")
LETTERS = "ABCD"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Please reason step by step, then answer with the letter of the correct option, "
    'in the form "The answer is (X)".'
)

# benchmark -> (hub id, config, split, question field, answer field)
HUB: dict[str, tuple[str, str | None, str, str, str]] = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train", "Question", "Correct Answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "gsm8k_cot": ("openai/gsm8k", "main", "test", "question", "answer"),
}
GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gsm8k_gold(answer: object) -> str:
    """The number of a GSM8K gold answer (``"... #### 1,234"`` -> ``"1234"``; plain numbers too)."""
    return extract_final_number(str(answer)) or str(answer).strip()


@dataclass
class ReasoningTask(Task):
    """AIME24 / GPQA-Diamond / MATH500 / GSM8K chain-of-thought task (see the module docstring).

    Settings (Hydra keys ``task.*``):
        benchmark: ``aime24``, ``gpqa_diamond``, ``math500`` or ``gsm8k_cot``.
        samples_per_question: k seeded samples per question (pass@1 averaged over k; >= 1).
        num_questions: first N questions of the seed-shuffled order, or null for all.
        source: ``hub`` (``datasets``) or ``local`` (``path``: a JSONL file).
        path: the local JSONL file (``source: local`` only).
        plus ``max_new_tokens``, ``stop``, ``chat_template`` from :class:`Task`.
    """

    name: ClassVar[str] = "reasoning"
    version: ClassVar[str] = "1"

    benchmark: str = "math500"
    samples_per_question: int = 1
    num_questions: int | None = None
    source: str = "hub"
    path: str | None = None
    max_new_tokens: int = 4096
    stop: list[str] = field(default_factory=list)
    chat_template: bool = True
    version_tag: str = "release_v5"
    start_date: str | None = "2024-08-01"
    end_date: str | None = "2025-02-01"
    test_timeout_s: float = 6.0
    problem_timeout_s: float = 60.0
    memory_mb: int = 1024
    math_grader: str = "math_verify"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.benchmark not in BENCHMARKS:
            raise ConfigError(
                f"task.benchmark={self.benchmark!r} is not supported; allowed: {', '.join(BENCHMARKS)}"
            )
        if not _is_int(self.samples_per_question) or self.samples_per_question < 1:
            raise ConfigError(
                f"task.samples_per_question must be an integer >= 1, got {self.samples_per_question!r}"
            )
        if self.num_questions is not None and (not _is_int(self.num_questions) or self.num_questions < 1):
            raise ConfigError(
                f"task.num_questions must be null (all) or an integer >= 1, got {self.num_questions!r}"
            )
        if self.source not in SOURCES:
            raise ConfigError(
                f"task.source={self.source!r} is not supported; allowed: {', '.join(SOURCES)}"
            )
        if self.source == "local" and not self.path:
            raise ConfigError("task.path must name a JSONL file when task.source=local")
        if self.source == "hub" and self.path:
            raise ConfigError(f"task.path={self.path!r} is only used with task.source=local")
        if not isinstance(self.chat_template, bool):
            raise ConfigError(f"task.chat_template must be true or false, got {self.chat_template!r}")
        if self.math_grader not in MATH_GRADERS:
            raise ConfigError(f"task.math_grader={self.math_grader!r} is not a grader; allowed: {', '.join(MATH_GRADERS)}")
        if self.math_grader == "math_verify" and importlib.util.find_spec("math_verify") is None:
            raise ConfigError("task.math_grader=math_verify needs the math-verify package: pip install "
                                  "math-verify, or task.math_grader=retrobench")  # fmt: skip
        for key in ("test_timeout_s", "problem_timeout_s", "memory_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"task.{key} must be a number > 0, got {value!r}")
        for key in ("start_date", "end_date"):
            if getattr(self, key) is not None:
                lcb.parse_date(getattr(self, key), f"task.{key}")
        self._problems: dict[str, dict[str, Any]] = {}

    @property
    def background_scoring(self) -> bool:
        """LiveCodeBench runs programs to score: the run layer grades in background threads."""
        return self.benchmark == "livecodebench"

    def limits(self) -> lcb.Limits:
        return lcb.Limits(float(self.test_timeout_s), float(self.problem_timeout_s), int(self.memory_mb))

    def workload(self) -> tuple[int, int]:
        questions = self.num_questions or HUB_SIZES[self.benchmark]
        return questions * self.samples_per_question, int(self.max_new_tokens)

    def settings(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("num_samples")  # unused: the run has num_questions x samples_per_question samples
        return {"task": self.name, "task_version": self.version, **fields}

    # ---- data --------------------------------------------------------------------------------

    def questions(self) -> list[dict[str, Any]]:
        """All questions of the benchmark: dicts with ``id``, ``question``, ``answer`` [, ``choices``]."""
        if self.benchmark == "livecodebench":
            return self._code_problems()
        rows = self._load_hub() if self.source == "hub" else self._load_local()
        if not rows:
            raise ConfigError(
                f"task.benchmark={self.benchmark}: the {self.source} source has no questions"
            )
        return rows

    def _code_problems(self) -> list[dict[str, Any]]:
        """LiveCodeBench problems of the release and date window (kept by id for grading)."""
        if self.source == "hub":
            where = f"{lcb.HUB_ID} (version_tag {self.version_tag})"
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise ConfigError(f"task.source=hub needs the `datasets` package to load {where}: pip install "
                                      "datasets, or use task.source=local task.path=<problems.jsonl>") from None  # fmt: skip
            try:
                rows = lcb.load_hub(self.version_tag)
            except Exception as exc:  # noqa: BLE001 - offline, renamed, script refused: one line
                offline = " (offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if _offline() else ""
                raise ConfigError(
                    f"task.source=hub could not load {where}{offline}: {type(exc).__name__}: {_one_line(exc, 160)}; "
                    "download it once with network access, or use task.source=local task.path=<problems.jsonl>"
                ) from None
            problems = [lcb.parse_problem(r, f"{lcb.HUB_ID} row {i}") for i, r in enumerate(rows)]
        else:
            path = Path(str(self.path)).expanduser()
            if not path.is_file():
                raise ConfigError(f"task.path={str(self.path)!r} is not a file (task.source=local needs a JSONL file)")
            problems = []
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    where = f"task.path={path}: line {line_no}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{where} is not JSON ({exc.msg})") from None
                    problems.append(lcb.parse_problem(row, where))
        problems = lcb.in_window(problems, self.start_date, self.end_date)
        self._problems = {p["id"]: p for p in problems}
        if len(self._problems) != len(problems):
            raise ConfigError(f"task.benchmark=livecodebench ({self.source}): duplicate question_id")
        return problems

    def _load_hub(self) -> list[dict[str, Any]]:
        hub_id, config, split, q_key, a_key = HUB[self.benchmark]
        where = f"{hub_id}" + (f" (config {config}, split {split})" if config else f" (split {split})")
        fallback = "or use task.source=local task.path=<file.jsonl> (fields: question, answer"
        fallback += ", choices)" if self.benchmark == "gpqa_diamond" else ")"
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                f"task.source=hub needs the `datasets` package to load {where}: "
                f"pip install datasets, {fallback}"
            ) from None
        try:
            rows = [dict(row) for row in datasets.load_dataset(hub_id, config, split=split)]
        except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: all end in the same advice
            offline = " (offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if _offline() else ""
            gated = " it is gated: accept its terms on huggingface.co and log in;" if "gpqa" in hub_id else ""
            raise ConfigError(
                f"task.source=hub could not load {where}{offline}: "
                f"{type(exc).__name__}: {_one_line(exc, 160)};{gated} "
                f"download it once with network access, {fallback}"
            ) from None
        out = []
        for index, row in enumerate(rows):
            item = {"id": f"{self.benchmark}-{index:04d}", "question": str(row[q_key]).strip()}
            if self.benchmark == "gpqa_diamond":
                item["choices"] = [str(row[a_key]).strip(), *(str(row[k]).strip() for k in GPQA_WRONG)]
                item["answer"] = item["choices"][0]
            else:
                item["answer"] = str(row[a_key]).strip()
            out.append(item)
        return out

    def _load_local(self) -> list[dict[str, Any]]:
        path = Path(str(self.path)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"task.path={str(self.path)!r} is not a file (task.source=local needs a JSONL file)"
            )
        out, seen = [], set()
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"task.path={path}: line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not JSON ({exc.msg})") from None
            needed = (
                ("question", "answer", "choices")
                if self.benchmark == "gpqa_diamond"
                else ("question", "answer")
            )
            missing = [k for k in needed if not isinstance(row, dict) or k not in row]
            if missing:
                raise ConfigError(
                    f"{where} lacks the field(s) {', '.join(missing)} (needs: {', '.join(needed)})"
                )
            item = {
                "id": str(row.get("id", f"{self.benchmark}-{len(out):04d}")),
                "question": str(row["question"]),
            }
            if item["id"] in seen:
                raise ConfigError(f"{where}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            if self.benchmark == "gpqa_diamond":
                item.update(_local_choices(row, where))
            else:
                item["answer"] = str(row["answer"]).strip()
            out.append(item)
        return out

    # ---- samples -----------------------------------------------------------------------------

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        """num_questions x samples_per_question samples, question-major, ids ``<qid>#<j>``."""
        rows = self.questions()
        if self.num_questions is not None:
            if self.num_questions > len(rows):
                raise ConfigError(
                    f"task.num_questions={self.num_questions} exceeds the {len(rows)} questions of "
                    f"{self.benchmark} ({self.source})"
                )
            order = list(range(len(rows)))
            random.Random(f"reasoning:{self.benchmark}:{seed}").shuffle(order)
            rows = [rows[i] for i in order[: self.num_questions]]
        out = []
        for row in rows:
            prompt, reference, meta = self._prompt(row, seed)
            meta.update(benchmark=self.benchmark, question_id=row["id"])
            for j in range(self.samples_per_question):
                out.append(
                    Sample(
                        id=f"{row['id']}#{j}",
                        prompt=prompt,
                        reference=reference,
                        meta={**meta, "sample_index": j},
                    )
                )
        return out

    def _prompt(self, row: dict[str, Any], seed: int) -> tuple[str, str, dict[str, Any]]:
        if self.benchmark == "livecodebench":
            return lcb.prompt(row), row["id"], {"testtype": row["mode"]}
        question = row["question"].strip()
        if self.benchmark != "gpqa_diamond":
            gold = gsm8k_gold(row["answer"]) if self.benchmark == "gsm8k_cot" else row["answer"]
            return f"{question}\n{MATH_INSTRUCTION}", gold, {}
        choices, gold = shuffle_choices(row["choices"], row["answer"], seed, row["id"])
        options = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(choices))
        prompt = f"{question}\n\n{options}\n\n{CHOICE_INSTRUCTION}"
        return prompt, gold, {"choices": choices}

    # ---- scoring -----------------------------------------------------------------------------

    def extract(self, output: str) -> str | None:
        """The answer the grader reads from ``output`` (None: no answer found)."""
        text = final_section(output)
        if self.benchmark == "livecodebench":
            return lcb.extract_code(text)
        if self.benchmark == "gpqa_diamond":
            return extract_choice(text, LETTERS)
        if self.benchmark == "gsm8k_cot":
            return extract_boxed(text) or extract_final_number(text)
        return extract_boxed(text)

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        """``accuracy`` 1/0 (this sample's pass@1) and ``completion`` (1 if an answer was extracted)."""
        pred = self.extract(output)
        if pred is None:
            return {"accuracy": 0.0, "completion": 0.0}
        if self.benchmark == "livecodebench":
            problem = self._problems.get(str(sample.meta.get("question_id")))
            if problem is None:  # score() before samples(): load the problems once
                self.questions()
                problem = self._problems[str(sample.meta["question_id"])]
            verdict = lcb.grade_problem(pred, problem, self.limits())
            return {"accuracy": float(verdict.passed), "completion": 1.0,
                    "tests_passed": verdict.tests_passed / verdict.tests, "verdict": verdict.status}  # fmt: skip
        if self.benchmark == "gpqa_diamond":
            correct = pred == sample.reference
        elif self.math_grader == "math_verify":
            correct = math_verify_equal(pred, sample.reference)
        else:
            correct = math_equal(pred, sample.reference)
        return {"accuracy": float(correct), "completion": 1.0}


def final_section(output: str) -> str:
    """The text after the last ``</think>`` when it has content, else the whole output."""
    if "</think>" in output:
        tail = output.rsplit("</think>", 1)[1]
        if tail.strip():
            return tail
    return output


def shuffle_choices(choices: list[str], answer: str, seed: int, qid: str) -> tuple[list[str], str]:
    """Options in a ``(seed, qid)``-deterministic order and the correct option's letter."""
    order = list(range(len(choices)))
    random.Random(f"gpqa:{seed}:{qid}").shuffle(order)
    shuffled = [choices[i] for i in order]
    return shuffled, LETTERS[shuffled.index(answer)]


def _local_choices(row: dict[str, Any], where: str) -> dict[str, Any]:
    choices = row["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) != len(LETTERS)
        or len(set(map(str, choices))) != len(choices)
    ):
        raise ConfigError(f"{where}: choices must be a list of {len(LETTERS)} distinct option texts")
    choices = [str(c).strip() for c in choices]
    answer = str(row["answer"]).strip()
    if re.fullmatch(r"\(?[A-D]\)?", answer) and answer.strip("()") not in choices:
        answer = choices[LETTERS.index(answer.strip("()"))]
    if answer not in choices:
        raise ConfigError(
            f"{where}: answer {_one_line(answer, 60)!r} is neither an option's text nor its letter"
        )
    return {"choices": choices, "answer": answer}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
