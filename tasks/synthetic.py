"""Length-controlled synthetic long-generation tasks with exact answers.

Two kinds, both built from a fixed word list with a seeded RNG so that every sample is a pure
function of ``(seed, sample index, tokenizer)``:

- ``retrieval``: a context of lines ``key 48213: value river-lamp``, then a list of keys to look
  up; the model answers line by line ``key 48213: river-lamp`` and ends with ``END``. Scored per
  key (matched by the key, not by position), so a skipped or reordered answer costs only itself.
- ``copy``: a passage of random words (8 per line, the last may be shorter), then "Repeat the
  passage above exactly" and the passage's first word; scored per line (exact after whitespace
  normalisation, by position).

``context_tokens`` sets the prompt length in the model's own tokens: lines are added until the
encoded prompt reaches the target (the smallest such number of lines, or words for copy, found by
bisection), so a prompt overshoots the target by at most one context line (retrieval) or word (copy).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample, Task, TextTokenizer

KINDS = ("retrieval", "copy")
WORDS_PER_LINE = 8  # copy passage line width
KEY_RANGE = (10_000, 100_000)  # 5-digit keys: up to 90 000 distinct context lines

WORDS: tuple[str, ...] = tuple(
    """
    apple amber anchor arrow autumn badge basket beacon berry birch blanket bottle bridge
    bucket cabin camel candle canyon carpet castle cedar chalk cherry cliff cloud clover
    comet copper coral cotton crane crystal daisy desert dolphin dragon drum eagle ember
    falcon feather fern forest fossil fountain garden garnet ginger glacier granite harbor
    hazel helmet hollow honey island ivory jacket jasmine jungle kettle lagoon lamp lantern
    lemon letter lily marble meadow mirror maple meteor mint monkey mountain needle nectar
    ocean olive orbit orchid otter paper pearl pebble pepper piano pillow planet pocket
    prairie quartz quill rabbit raven ribbon river rocket saddle salmon sapphire shadow
    silver spruce stone summer sunset thunder tiger timber tulip tunnel velvet violet
    walnut willow window winter wizard zebra
    """.split()
)

# An answer line: "key 48213: river-lamp" (a leading "value " is tolerated; the value must have the
# word-word form, so "key 48213: I do not know" is no answer).
_ANSWER_RE = re.compile(r"key\s+(\d+)\s*:\s*(?:value\s+)?([A-Za-z]+-[A-Za-z]+)\b")


@dataclass
class SyntheticTask(Task):
    """Synthetic retrieval / copy task.

    Settings (Hydra keys ``task.*``):
        kind: ``retrieval`` or ``copy``.
        context_tokens: target prompt length in tokenizer tokens (>= 16).
        num_queries: retrieval only: keys to look up per sample (>= 1).
        plus ``num_samples``, ``max_new_tokens``, ``stop``, ``chat_template`` from :class:`Task`.
    """

    name: ClassVar[str] = "synthetic"
    version: ClassVar[str] = "1"

    kind: str = "retrieval"
    context_tokens: int = 512
    num_queries: int = 8
    stop: list[str] = field(default_factory=lambda: ["END"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in KINDS:
            raise ConfigError(f"task.kind={self.kind!r} is not supported; allowed: {', '.join(KINDS)}")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 16:
            raise ConfigError(
                f"task.context_tokens must be an integer >= 16, got {self.context_tokens!r}"
            )
        if not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise ConfigError(f"task.num_queries must be an integer >= 1, got {self.num_queries!r}")

    # ---- samples -----------------------------------------------------------------------------

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        """``num_samples`` samples, a pure function of ``(seed, tokenizer)``."""
        build = self._retrieval_sample if self.kind == "retrieval" else self._copy_sample
        return [build(tokenizer, seed, i) for i in range(self.num_samples)]

    def _answer_prefix(self, text: str) -> str:
        # With a chat template the prompt ends the user turn, so the model starts on its own.
        return "" if self.chat_template else text

    def _retrieval_sample(self, tokenizer: TextTokenizer, seed: int, index: int) -> Sample:
        rng = random.Random(_sample_seed(seed, index))
        lines: list[tuple[str, str]] = []  # grown lazily, deterministic prefix

        def prompt_for(n: int) -> tuple[str, list[tuple[str, str]]]:
            _extend_pairs(lines, rng, n)
            queries = _choose_queries(lines[:n], self.num_queries, _sample_seed(seed, index, "queries"))
            return retrieval_prompt(lines[:n], queries, self._answer_prefix(f"key {queries[0][0]}:")), queries

        n = _fit_length(lambda k: prompt_for(k)[0], tokenizer, self.context_tokens, self.num_queries, "line")
        prompt, queries = prompt_for(n)
        return Sample(
            id=f"synthetic-retrieval-s{seed}-{index}",
            prompt=prompt,
            reference=[[k, v] for k, v in queries],
            meta={
                "kind": "retrieval",
                "context_lines": n,
                "prompt_tokens": _length(tokenizer, prompt),
                "answer_prefix": self._answer_prefix(f"key {queries[0][0]}:"),
            },
        )

    def _copy_sample(self, tokenizer: TextTokenizer, seed: int, index: int) -> Sample:
        rng = random.Random(_sample_seed(seed, index))
        words: list[str] = []

        def passage_for(n: int) -> list[str]:  # n words, WORDS_PER_LINE to a line
            while len(words) < n:
                words.append(rng.choice(WORDS))
            return [" ".join(words[i : min(n, i + WORDS_PER_LINE)]) for i in range(0, n, WORDS_PER_LINE)]

        def prompt_for(k: int) -> str:
            return copy_prompt(passage_for(k), self._answer_prefix(passage_for(k)[0].split()[0]))

        n = _fit_length(prompt_for, tokenizer, self.context_tokens, 1, "word")
        passage = passage_for(n)
        prompt = prompt_for(n)
        return Sample(
            id=f"synthetic-copy-s{seed}-{index}",
            prompt=prompt,
            reference=passage,
            meta={
                "kind": "copy",
                "context_words": n,
                "prompt_tokens": _length(tokenizer, prompt),
                "answer_prefix": self._answer_prefix(passage[0].split()[0]),
            },
        )

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        """``accuracy`` and ``completion`` of ``output`` (the generated text after the prompt).

        retrieval: accuracy = share of queried keys whose first answer line carries the right
        value (matched by key, in any order); completion = share of queried keys with an answer
        line. The prompt's trailing answer prefix (``key N:``) is prepended to ``output``.
        copy: accuracy = share of passage lines reproduced exactly (whitespace-normalised) at
        their position; completion = share of passage lines for which a non-empty output line
        exists before ``END`` (any text counts: it measures length, not correctness). The prompt's
        trailing first passage word is prepended to ``output``.
        """
        text = sample.meta.get("answer_prefix", "") + output
        if sample.meta.get("kind", self.kind) == "copy":
            return score_copy(list(sample.reference), text)
        return score_retrieval([(str(k), str(v)) for k, v in sample.reference], text)


# ---- prompt builders (pure) ----------------------------------------------------------------------


def retrieval_prompt(lines: list[tuple[str, str]], queries: list[tuple[str, str]], prefix: str) -> str:
    """The retrieval prompt: context lines, the instruction, the key list, then ``prefix``."""
    context = "\n".join(f"key {k}: value {v}" for k, v in lines)
    keys = ", ".join(k for k, _ in queries)
    return (
        "Each line below gives a key and its value.\n"
        f"{context}\n\n"
        "For each key in the list below, in order, write one line \"key <number>: <value>\" "
        "with the value given above. After the last line write END.\n"
        f"Keys: {keys}\n\n"
        f"{prefix}"
    )


def copy_prompt(passage: list[str], prefix: str) -> str:
    """The copy prompt: the passage, the instruction to repeat it, then ``prefix``."""
    body = "\n".join(passage)
    return (
        f"Passage:\n{body}\n\n"
        "Repeat the passage above exactly, line by line. After the last line write END.\n\n"
        f"Passage:\n{prefix}"
    )


# ---- scorers (pure) ------------------------------------------------------------------------------


def parse_answers(text: str) -> dict[str, str]:
    """``{key: value}`` from lines like ``key 48213: river-lamp`` (first answer per key wins).

    ``value `` before the value is tolerated (small models copy the context format); a line whose
    value is not of the ``word-word`` form is not an answer.
    """
    answers: dict[str, str] = {}
    for line in text.splitlines():
        match = _ANSWER_RE.search(line)
        if match and match.group(1) not in answers:
            answers[match.group(1)] = match.group(2).lower()
    return answers


def score_retrieval(expected: list[tuple[str, str]], text: str) -> dict[str, float]:
    """Per-key accuracy and completion of ``text`` against ``expected`` ``[(key, value)]``."""
    answers = parse_answers(text)
    correct = sum(answers.get(k) == v for k, v in expected)
    present = sum(k in answers for k, _ in expected)
    n = max(1, len(expected))
    return {"accuracy": correct / n, "completion": present / n}


def score_copy(expected: list[str], text: str) -> dict[str, float]:
    """Per-line positional exact-match accuracy and completion of ``text`` against ``expected``."""
    got = [" ".join(line.split()) for line in text.split("END")[0].splitlines()]
    got = [line for line in got if line]
    correct = sum(a == " ".join(b.split()) for a, b in zip(got, expected))
    n = max(1, len(expected))
    return {"accuracy": correct / n, "completion": min(len(got), len(expected)) / n}


# ---- helpers -------------------------------------------------------------------------------------


def _sample_seed(seed: int, index: int, salt: str = "") -> str:
    """A stable RNG seed for one sample (str seeds hash with SHA-512: stable across processes)."""
    return f"retrobench.synthetic/{seed}/{index}/{salt}"


def _extend_pairs(lines: list[tuple[str, str]], rng: random.Random, n: int) -> None:
    """Grow ``lines`` to ``n`` ``(key, value)`` pairs with distinct keys."""
    if n > KEY_RANGE[1] - KEY_RANGE[0]:
        raise ConfigError(f"task.context_tokens is too large: more than {n - 1} key lines needed")
    used = {k for k, _ in lines}
    while len(lines) < n:
        key = str(rng.randrange(*KEY_RANGE))
        if key not in used:
            used.add(key)
            lines.append((key, f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"))


def _choose_queries(lines: list[tuple[str, str]], k: int, seed: str) -> list[tuple[str, str]]:
    """``k`` distinct lines in random order (seeded)."""
    return random.Random(seed).sample(lines, k)


def _length(tokenizer: TextTokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _fit_length(
    prompt_for: Callable[[int], str], tokenizer: TextTokenizer, target: int, minimum: int, unit: str
) -> int:
    """Smallest count ``n >= minimum`` of units (lines or words) whose prompt encodes to ``>= target``
    tokens, found by bisection (prompt length grows with ``n``).

    Raises ConfigError when even ``minimum`` lines overshoot the target by more than 10%.
    """
    if _length(tokenizer, prompt_for(minimum)) >= target:
        if _length(tokenizer, prompt_for(minimum)) > 1.1 * target:
            raise ConfigError(
                f"task.context_tokens={target} is too small for the instructions and {minimum} {unit}(s) "
                f"({_length(tokenizer, prompt_for(minimum))} tokens); raise task.context_tokens"
                + (" or lower task.num_queries" if unit == "line" else "")
            )
        return minimum
    lo, hi = minimum, minimum * 2  # invariant: prompt(lo) < target
    while _length(tokenizer, prompt_for(hi)) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _length(tokenizer, prompt_for(mid)) < target:
            lo = mid
        else:
            hi = mid
    return hi

