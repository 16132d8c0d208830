"""LongGenBench (Liu, Dong, Hu, Chu; EMNLP 2024 Findings): many questions, one long generation.

Not the long-writing benchmark of the same name (Wu et al.). ``num_questions`` questions of GSM8K,
MMLU or CommonsenseQA go into ONE prompt after few-shot exemplars, and the model answers them all
in one response; accuracy over all answers measures how well reasoning holds up along a long
output. The prompt mirrors the official GSM8K prompt file (8 demos; MMLU/CSQA: 5): the exemplar
questions ``Question_1..Question_s``, then their answers ``Answer_1..Answer_s``, then the new
questions numbered on from ``s + 1`` (as in the official scripts and SCOPE's JSONL), e.g. (s=1)::

    <instruction: answer all 15 questions, start each with "Answer_k:", end with "The answer is ...">

    Examples:
    Question_1:
    Ava has 12 apples. Ava buys 3 packs with 4 apples in each pack. How many apples ...?

    Answer_1:
    Ava buys 3 * 4 = 12 apples.
    12 + 12 = 24.
    The answer is 24.

    Following Question:
    Question_2:
    ...
    Question_16:
    ...

MMLU/CSQA questions list their options as ``(A) ... (B) ...`` and exemplar answers end with
"The answer is (B)."; GSM8K answers end with "The answer is 42.". Choices (ours): the instruction
(the official *system* message, paraphrased) opens the user prompt, since the engine has no system
turn; hub MMLU/CSQA exemplars have no chain of thought (dev/train splits carry none), so they are
just "The answer is (X)."; with ``chat_template: false`` the prompt ends with ``Answer_<s+1>:``.

Sources: ``synthetic`` (offline default: templated arithmetic word problems with exact integer
answers, and templated multiple-choice questions from fixed word lists and facts; exemplars from
the same generators on another seed stream), ``hub`` (``datasets``: openai/gsm8k main test,
cais/mmlu all test (one subject per prompt, exemplars from its dev split, as the official script),
tau/commonsense_qa validation; GSM8K/CSQA exemplars from train), ``local`` (JSONL in SCOPE's row
schema ``{prompt, questions, answers}``; the first ``num_questions`` questions of each row are kept).

Scoring matches every answer by its ``Answer_<k>`` index, never by position (see :func:`score_answers`).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar, Optional

from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample, Task, TextTokenizer
from retrobench.tasks.lib.longgenbench_data import (
    HUB,
    Item,
    choice_problem,
    distinct_items,
    gsm8k_problem,
    hub_item,
    load_hub_split,
)

DATASETS = ("gsm8k", "mmlu", "csqa")
SOURCES = ("synthetic", "hub", "local")
DEFAULT_SHOTS = {"gsm8k": 8, "mmlu": 5, "csqa": 5}  # the official prompt files (SCOPE's CSQA file: 5)
OPTIONS = {"gsm8k": "", "mmlu": "ABCD", "csqa": "ABCDE"}
Batch = tuple[Optional[str], list[Item], list[Item]]  # (subject, exemplars, questions)


@dataclass
class LongGenBenchTask(Task):
    """LongGenBench: ``num_questions`` questions answered in one generation.

    Parameters
    ----------
    dataset : {"gsm8k", "mmlu", "csqa"}
    num_questions : int
        Questions per prompt (>= 1; the papers use 15 / 30 / 45 and more).
    source : {"synthetic", "hub", "local"}
        Offline generators, the hub through ``datasets``, or the JSONL file at ``path``.
    path : str, optional
        The JSONL file of ``source="local"`` (SCOPE's rows ``{prompt, questions, answers}``).
    num_shots : int, optional
        Exemplars (>= 0); None = the official count (GSM8K 8, MMLU / CSQA 5). Ignored by
        ``local`` (each row's prompt carries its own).
    tokens_per_question : int
        Generation allowance per question, used when ``max_new_tokens`` is None.
    max_new_tokens : int, optional
        None = ``tokens_per_question * num_questions``.
    num_samples, stop, chat_template
        As in :class:`Task`; ``chat_template`` defaults to true (instruct models).
    """

    name: ClassVar[str] = "longgenbench"
    version: ClassVar[str] = "1"

    dataset: str = "gsm8k"
    num_questions: int = 15
    source: str = "synthetic"
    path: str | None = None
    num_shots: int | None = None
    tokens_per_question: int = 60
    max_new_tokens: int | None = None  # type: ignore[assignment]
    chat_template: bool = True

    def __post_init__(self) -> None:
        for key, allowed in (("dataset", DATASETS), ("source", SOURCES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"task.{key}={getattr(self, key)!r} is not supported; allowed: {', '.join(allowed)}"
                )
        for key in ("num_questions", "tokens_per_question", "num_shots"):
            value = getattr(self, key)
            if key == "num_shots" and value is None:
                value = self.num_shots = DEFAULT_SHOTS[self.dataset]
            low = 0 if key == "num_shots" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"task.{key} must be an integer >= {low}, got {value!r}")
        if self.max_new_tokens is None:
            self.max_new_tokens = self.tokens_per_question * self.num_questions
        super().__post_init__()
        if self.source == "local" and not self.path:
            raise ConfigError(
                "task.path is required with task.source=local (JSONL rows {prompt, questions, answers})"
            )
        if self.source == "local" and not Path(str(self.path)).expanduser().is_file():
            raise ConfigError(f"task.path={self.path} is not a file (task.source=local)")

    # ---- samples -----------------------------------------------------------------------------

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        """``num_samples`` prompts, a pure function of ``seed`` (and of the data for hub / local)."""
        if self.source == "local":
            return self._local_samples(seed)
        batches = self._hub_batches(seed) if self.source == "hub" else self._synthetic_batches(seed)
        out = []
        for i, (subject, shots, questions) in enumerate(batches):
            body = build_prompt(instruction(self.dataset, len(questions), subject), shots, questions)
            golds = [gold_answer(self.dataset, q.gold) for q in questions]
            out.append(self._sample(f"s{seed}-{i}", body, golds, len(shots) + 1, subject))
        return out

    def _sample(self, tag: str, body: str, golds: list[str], first: int, subject: str | None) -> Sample:
        prefix = "" if self.chat_template else f"Answer_{first}:"
        meta = {"dataset": self.dataset, "first_index": first, "num_questions": len(golds)}
        meta.update(options=OPTIONS[self.dataset], subject=subject, answer_prefix=prefix)
        return Sample(
            id=f"longgenbench-{self.dataset}-{self.source}-n{len(golds)}-{tag}",
            prompt=body + (f"\n\n{prefix}" if prefix else ""),
            reference=golds,
            meta=meta,
        )

    def _synthetic_batches(self, seed: int) -> list[Batch]:
        letters, stream = OPTIONS[self.dataset], f"retrobench.longgenbench/{self.dataset}/{seed}"
        make = gsm8k_problem if self.dataset == "gsm8k" else lambda rng: choice_problem(rng, letters)
        shots = distinct_items(make, random.Random(f"{stream}/shots"), int(self.num_shots or 0), set())
        subject = "general knowledge" if self.dataset == "mmlu" else None
        seen = {s.text for s in shots}
        return [
            (subject, shots, distinct_items(make, random.Random(f"{stream}/{i}"), self.num_questions, seen))
            for i in range(self.num_samples)
        ]

    def _hub_batches(self, seed: int) -> list[Batch]:
        n, k, ds = self.num_questions, int(self.num_shots or 0), self.dataset
        hub_id, _, q_split, s_split = HUB[ds]
        questions = [(hub_item(ds, r), r.get("subject")) for r in load_hub_split(ds, q_split)]
        shots = [(hub_item(ds, r), r.get("subject")) for r in load_hub_split(ds, s_split)]
        rng = random.Random(f"retrobench.longgenbench/hub/{ds}/{seed}")
        if ds == "mmlu":  # one subject per prompt, exemplars from that subject's dev split (official)
            subjects = sorted(s for s, c in Counter(s for _, s in questions).items() if c >= n)
            if not subjects:
                raise ConfigError(f"task.num_questions={n}: no MMLU subject has that many test questions")
            rng.shuffle(subjects)
            out = []
            for i in range(self.num_samples):
                subject = subjects[i % len(subjects)]
                pool = [q for q, s in shots if s == subject]
                if len(pool) < k:
                    raise ConfigError(f"task.num_shots={k} exceeds the {len(pool)} dev rows of {subject}")
                chosen = rng.sample([q for q, s in questions if s == subject], n)
                out.append((subject.replace("_", " "), rng.sample(pool, k), chosen))
            return out
        if self.num_samples * n > len(questions) or k > len(shots):
            raise ConfigError(
                f"task.num_samples x task.num_questions = {self.num_samples * n} (or task.num_shots={k}) "
                f"exceeds the {len(questions)} questions ({len(shots)} exemplars) of {hub_id}"
            )
        order = rng.sample(range(len(questions)), self.num_samples * n)
        exemplars = [q for q, _ in rng.sample(shots, k)]
        return [
            (None, exemplars, [questions[j][0] for j in order[i * n : (i + 1) * n]])
            for i in range(self.num_samples)
        ]

    def _local_samples(self, seed: int) -> list[Sample]:
        path, n = Path(str(self.path)).expanduser(), self.num_questions
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                raise ConfigError(f"task.path={path}: line {lineno} is not JSON") from None
            if row is None:
                continue
            if not isinstance(row, dict) or any(k not in row for k in ("prompt", "questions", "answers")):
                raise ConfigError(f"task.path={path}: line {lineno} lacks prompt, questions or answers")
            if min(len(row["questions"]), len(row["answers"])) < n:
                raise ConfigError(
                    f"task.num_questions={n} exceeds the questions on line {lineno} of {path}"
                )
            rows.append((lineno, row))
        if len(rows) < self.num_samples:
            raise ConfigError(f"task.num_samples={self.num_samples} exceeds the {len(rows)} rows")
        out = []
        for lineno, row in random.Random(f"longgenbench/local/{seed}").sample(rows, self.num_samples):
            prompt = str(row["prompt"]).rstrip()
            numbers = [int(m) for m in re.findall(r"Question_(\d+)\s*:", prompt)]
            first = max(numbers) - len(row["questions"]) + 1 if numbers else 1
            cut = re.search(rf"Question_{first + n}\s*:", prompt)  # keep the first n questions only
            prompt = prompt[: cut.start()].rstrip() if cut else prompt
            golds = [gold_answer(self.dataset, a) for a in row["answers"][:n]]
            subject = str(row.get("task") or "").replace("_", " ") or None if self.dataset == "mmlu" else None
            body = instruction(self.dataset, n, subject) + "\n\n" + prompt
            out.append(self._sample(f"s{seed}-line{lineno}", body, golds, first, subject))
        return out

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        """Per-question ``accuracy``, ``completion``, ``answered`` and ``correct`` of ``output``
        (:func:`score_answers`); the prompt's trailing ``Answer_<k>:`` (no chat template) is prepended."""
        meta = sample.meta
        return score_answers(
            list(sample.reference),
            meta.get("answer_prefix", "") + output,
            int(meta["first_index"]),
            meta.get("dataset", self.dataset),
            meta.get("options", OPTIONS[self.dataset]),
        )


# ---- prompts and data (pure) ---------------------------------------------------------------------


def instruction(dataset: str, n: int, subject: str | None = None) -> str:
    """The task instruction for ``n`` questions (the official system message, paraphrased)."""
    final = "The answer is <number>." if dataset == "gsm8k" else "The answer is (<letter>)."
    head = f"The following are multiple choice questions (with answers) about {subject}.\n" if subject else ""
    return head + (
        f'Answer all {n} questions after "Following Question" in one response, step by step, in the '
        'format of the examples. Start the answer to Question_k with "Answer_k:" (the same number k), '
        f'end every answer with "{final}", do not repeat the questions, and answer every question.'
    )


def build_prompt(head: str, shots: list[Item], questions: list[Item]) -> str:
    """``head``, the exemplar questions then their answers (``Question_1..s``, ``Answer_1..s``),
    then ``Following Question:`` and the questions numbered ``s + 1 .. s + n`` (the official layout)."""
    parts = [head, ""]
    if shots:
        parts.append("Examples:")
        parts += [f"Question_{i}:\n{s.text}\n" for i, s in enumerate(shots, 1)]
        parts += [f"Answer_{i}:\n{s.solution}\n" for i, s in enumerate(shots, 1)]
    parts.append("Following Question:")
    parts += [f"Question_{len(shots) + i}:\n{q.text}" for i, q in enumerate(questions, 1)]
    return "\n".join(parts)


def gold_answer(dataset: str, answer: Any) -> str:
    """Canonical gold: GSM8K "... #### 1,000" -> ``"1000"``; a letter or MMLU index 1 -> ``"B"``."""
    if dataset == "gsm8k":
        return extract_number(str(answer)) or str(answer).strip()
    if isinstance(answer, int) and not isinstance(answer, bool):
        return OPTIONS[dataset][answer]
    return str(answer).strip().strip("()").upper()


# ---- scoring (pure) ------------------------------------------------------------------------------

_TAG = re.compile(r"(?:Answer|(?P<q>Question))_\s*(?P<k>\d+)\s*\**\s*:?\**", re.I)  # "**Answer_9:**" too
_NUM = re.compile(  # optional sign / "$", then 1,234,567.89 or 1234567.89; not inside a word
    r"(?<![\w.])(?P<sign>[-\u2212](?=\$?\d))?\$?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
)
_FINAL = re.compile(r"answer\s+is\s*:?|####", re.I)


def parse_answers(text: str) -> dict[int, str]:
    """``{k: block}`` for every ``Answer_<k>`` tag in ``text``; a block runs to the next
    ``Answer_`` (or ``Question_``) tag. The first block of an index wins (a repeat is ignored)."""
    tags = list(_TAG.finditer(text))
    answers: dict[int, str] = {}
    for tag, nxt in zip(tags, [*tags[1:], None]):
        k = int(tag.group("k"))
        if tag.group("q") is None and k not in answers:
            answers[k] = text[tag.end() : nxt.start() if nxt else len(text)].strip(" \t\r\n*")
    return answers


def _canonical(sign: str | None, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    value = -value if sign else value
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def extract_number(text: str | None) -> str | None:
    """The final number of a GSM8K answer, canonical (``"1,234.0"`` -> ``"1234"``, ``"-$5"`` -> ``"-5"``).

    The first number after the last "answer is" / "####" wins; else the last number in ``text``.
    """
    if not text:
        return None
    finals = list(_FINAL.finditer(text))
    match = _NUM.search(text, finals[-1].end()) if finals else None
    if match is None:
        numbers = list(_NUM.finditer(text))
        match = numbers[-1] if numbers else None
    return None if match is None else _canonical(match.group("sign"), match.group("num"))


def extract_letter(text: str | None, options: str = "ABCD") -> str | None:
    """The chosen option letter (one of ``options``), by precedence: "answer is (B)" / "Answer: B",
    then the last "(B)", then the last "B)", then the last standalone capital "B" ending a line or
    followed by punctuation (so the article "A" in "A dog" is no answer)."""
    if not text or not options:
        return None
    x = f"[{re.escape(options)}]"
    for pattern in (
        rf"(?<!\w)(?i:answer)(?:\s+is)?\s*[:\-]?\s*\(?({x})\)?(?![\w'])",
        rf"\(({x})\)",
        rf"(?<![\w(])({x})\)",
        rf"(?<![\w'])({x})(?=[ \t]*(?:[.,;:!]|$))",
    ):
        hits = re.findall(pattern, text, re.M)
        if hits:
            return hits[-1]
    return None


def score_answers(
    golds: list[str], text: str, first: int, dataset: str, options: str = ""
) -> dict[str, float]:
    """Score ``text`` against ``golds`` for questions ``first .. first + n - 1``, by their
    ``Answer_<k>`` index (any order; indices outside the range are ignored).

    Returns ``accuracy`` (correct / n), ``completion`` (answered / n) and the counts ``answered``
    (blocks with an extractable number / valid letter) and ``correct``. A cut-off output scores the
    answers present; a repeated index counts its first block only.
    """
    answers = parse_answers(text)
    answered = correct = 0
    for k, gold in enumerate(golds):
        block = answers.get(first + k)
        if dataset == "gsm8k":
            pred = extract_number(block)
        else:
            pred = extract_letter(block, options or OPTIONS[dataset])
        answered += pred is not None
        correct += pred is not None and pred == gold
    n = max(1, len(golds))
    return {"accuracy": correct / n, "completion": answered / n, "answered": answered, "correct": correct}
