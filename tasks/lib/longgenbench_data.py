"""Where the questions of the LongGenBench task (:mod:`retrobench.tasks.longgenbench`) come from.

``source: synthetic`` needs questions with exact answers on any machine, without downloads:

- :func:`gsm8k_problem`: templated arithmetic word problems (2 steps, integer answers, some
  negative, some above 999), with a worked solution ending "The answer is N." for exemplars;
- :func:`choice_problem`: templated multiple-choice questions (categories, capitals, sums, the
  largest number, opposites) built from fixed word lists, with options ``(A) ... (B) ...`` and one
  right letter, exemplar solution ending "The answer is (X).".

Every generator is a pure function of its ``random.Random``; the word lists are disjoint, so each
question has exactly one right option. ``source: hub`` reads rows through ``datasets``
(:func:`load_hub_split`, the only place that imports it) and turns them into :class:`Item` s
(:func:`hub_item`).
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, NamedTuple

from retrobench.conf import ConfigError

HUB = {  # dataset -> (hub id, config, question split, exemplar split)
    "gsm8k": ("openai/gsm8k", "main", "test", "train"),
    "mmlu": ("cais/mmlu", "all", "test", "dev"),
    "csqa": ("tau/commonsense_qa", None, "validation", "train"),
}


class Item(NamedTuple):
    """One question: ``text`` as shown (options included), ``gold`` answer (canonical number or
    letter), and ``solution``, the exemplar answer text ending with "The answer is ..."."""

    text: str
    gold: str
    solution: str


def options_text(question: str, options: list[str], letters: str) -> str:
    """``question`` then one line ``(A) first (B) second ...`` (the official MMLU layout)."""
    return question.strip() + "\n" + " ".join(f"({x}) {o}" for x, o in zip(letters, options))


NAMES = "Ava Ben Chloe Diego Emma Farah Hugo Iris Jonas Kira Liam Maya Noah Olga Pavel Rosa".split()
ITEMS = "apples marbles stickers pencils cookies stamps shells cards beads buttons".split()
CATEGORIES = {
    "fruit": "apple banana grape mango pear kiwi melon papaya fig apricot".split(),
    "animal": "tiger horse rabbit eagle dolphin camel otter wolf zebra monkey".split(),
    "color": "red blue green yellow purple brown black white pink gray".split(),
    "vehicle": "car bus truck bicycle train tractor scooter taxi van canoe".split(),
    "musical instrument": "piano violin guitar drum flute trumpet cello harp banjo clarinet".split(),
    "tool": "hammer wrench axe shovel drill chisel rake pliers screwdriver trowel".split(),
}
CAPITALS = dict(
    pair.split(":")
    for pair in (
        "France:Paris Japan:Tokyo Italy:Rome Egypt:Cairo Canada:Ottawa Kenya:Nairobi Spain:Madrid "
        "Germany:Berlin Peru:Lima Norway:Oslo Greece:Athens Russia:Moscow Thailand:Bangkok Cuba:Havana "
        "Ireland:Dublin Chile:Santiago"
    ).split()
)
OPPOSITES = dict(
    pair.split(":")
    for pair in (
        "hot:cold big:small fast:slow early:late happy:sad light:dark open:closed full:empty hard:soft "
        "high:low wet:dry old:young loud:quiet rich:poor strong:weak thick:thin"
    ).split()
)


def gsm8k_problem(rng: random.Random) -> Item:
    """A templated arithmetic word problem with an exact integer answer and a worked solution."""
    name, item, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(7)
    a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
    if kind == 0:
        q = (
            f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?"
        )
        steps, ans = [f"{name} buys {b} * {c} = {b * c} {item}.", f"{a} + {b * c} = {a + b * c}."], a + b * c
    elif kind == 1:
        cash = b * c + a
        q = f"{name} had ${cash} and bought {b} books for ${c} each. How many dollars does {name} have left?"
        steps, ans = [f"The books cost {b} * {c} = {b * c} dollars.", f"{cash} - {b * c} = {a}."], a
    elif kind == 2:
        extra = rng.randint(1, b - 1)
        total = b * c + extra
        q = (
            f"{name} has {total} {item}, keeps {extra} and shares the rest equally among {b} friends. "
            f"How many {item} does each friend get?"
        )
        steps, ans = [f"{total} - {extra} = {b * c} {item} are shared.", f"{b * c} / {b} = {c}."], c
    elif kind == 3:
        q = (
            f"{name} reads {c} pages every day for {b} days and then {a} pages on the last day. "
            f"How many pages does {name} read in total?"
        )
        steps = [f"In {b} days {name} reads {b} * {c} = {b * c} pages.", f"{b * c} + {a} = {b * c + a}."]
        ans = b * c + a
    elif kind == 4:  # often below zero: exercises signed answers
        drop = a + rng.randint(1, 20) if rng.random() < 0.6 else rng.randint(1, a)
        q = (
            f"The temperature was {a} degrees at noon and fell by {drop} degrees by midnight. "
            "What was the temperature at midnight, in degrees?"
        )
        steps, ans = [f"{a} - {drop} = {a - drop}."], a - drop
    elif kind == 5:
        give = rng.randint(1, a * b - 1)
        q = (
            f"A box holds {a} {item}. {name} fills {b} boxes and then gives away {give} {item}. "
            f"How many {item} are left?"
        )
        steps = [f"{b} boxes hold {b} * {a} = {a * b} {item}.", f"{a * b} - {give} = {a * b - give}."]
        ans = a * b - give
    else:  # large numbers: the solution writes them with thousands separators
        per, days = rng.randint(120, 990), rng.randint(11, 60)
        q = f"A factory makes {per} toys per day. How many toys does it make in {days} days?"
        steps, ans = [f"{per} * {days} = {per * days:,}."], per * days
    return Item(q, str(ans), "\n".join(steps) + f"\nThe answer is {ans}.")


def choice_problem(rng: random.Random, letters: str) -> Item:
    """A templated multiple-choice question with ``len(letters)`` options, exactly one right."""
    k, kind = len(letters), rng.randrange(5)
    if kind == 0:
        cat = rng.choice(sorted(CATEGORIES))
        right = rng.choice(CATEGORIES[cat])
        wrong = rng.sample([w for c, ws in sorted(CATEGORIES.items()) if c != cat for w in ws], k - 1)
        art = "an" if cat[0] in "aeiou" else "a"
        q, why = f"Which of these is {art} {cat}?", f"{right} is {art} {cat}; the others are not."
    elif kind == 1:
        country = rng.choice(sorted(CAPITALS))
        right = CAPITALS[country]
        wrong = rng.sample(sorted(v for v in CAPITALS.values() if v != right), k - 1)
        q, why = f"What is the capital of {country}?", f"The capital of {country} is {right}."
    elif kind == 2:
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        right = str(x + y)
        wrong = [str(x + y + d) for d in rng.sample([d for d in range(-9, 10) if d], k - 1)]
        q, why = f"What is {x} + {y}?", f"{x} + {y} = {x + y}."
    elif kind == 3:
        values = rng.sample(range(10, 1000), k)
        right, wrong = str(max(values)), [str(v) for v in values if v != max(values)]
        q, why = "Which number is the largest?", f"{right} is larger than the other options."
    else:
        word = rng.choice(sorted(OPPOSITES))
        right = OPPOSITES[word]
        wrong = rng.sample(sorted(v for v in OPPOSITES.values() if v != right), k - 1)
        q, why = f'What is the opposite of "{word}"?', f"The opposite of {word} is {right}."
    options = [*wrong, right]
    rng.shuffle(options)
    letter = letters[options.index(right)]
    return Item(options_text(q, options, letters), letter, f"{why} The answer is ({letter}).")


def distinct_items(
    make: Callable[[random.Random], Item], rng: random.Random, n: int, exclude: set[str]
) -> list[Item]:
    """``n`` items from ``make(rng)`` with distinct texts, none of them in ``exclude``."""
    items: list[Item] = []
    seen = set(exclude)
    for _ in range(100 * n + 1000):
        if len(items) == n:
            return items
        item = make(rng)
        if item.text not in seen:
            seen.add(item.text)
            items.append(item)
    if len(items) == n:
        return items
    raise ConfigError(f"task.num_questions={n}: the synthetic generator has too few distinct questions")


# ---- the hub ------------------------------------------------------------------------------------


def hub_item(dataset: str, row: dict[str, Any]) -> Item:
    """An :class:`Item` from a hub row: gsm8k {question, answer}; mmlu {question, choices,
    answer (index)}; csqa {question, choices {label, text}, answerKey}. GSM8K solutions drop the
    ``<<...>>`` calculator notes and end with "The answer is N." instead of "#### N"."""
    if dataset == "gsm8k":
        steps, _, gold = str(row["answer"]).partition("####")
        gold = gold.strip().replace(",", "")
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        return Item(str(row["question"]).strip(), gold, f"{steps}\nThe answer is {gold}.")
    if dataset == "mmlu":
        text = options_text(row["question"], list(row["choices"]), "ABCD")
        gold = "ABCD"[row["answer"]] if isinstance(row["answer"], int) else str(row["answer"])
    else:
        labels = "".join(row["choices"]["label"])
        text = options_text(row["question"], list(row["choices"]["text"]), labels)
        gold = str(row["answerKey"])
    return Item(text, gold, f"The answer is ({gold}).")


def load_hub_split(dataset: str, split: str) -> list[dict[str, Any]]:
    """Rows of one split of the dataset on the hub (``datasets.load_dataset``, imported here only).

    Raises
    ------
    ConfigError
        One line naming the dataset id and the local alternative, when ``datasets`` is missing or
        the hub is unreachable (offline, ``HF_DATASETS_OFFLINE=1`` without a cached copy, ...).
    """
    hub_id, config, _, _ = HUB[dataset]
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "task.source=hub needs the datasets package (pip install datasets), or use synthetic / local"
        ) from None
    try:
        return [dict(r) for r in datasets.load_dataset(hub_id, config, split=split)]
    except Exception as exc:  # offline, network, cache or split errors: all one line
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise ConfigError(
            f"task.source=hub could not load {hub_id}{f' ({config})' if config else ''} split {split} "
            f"through datasets ({why}); the hub is unreachable or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: "
            "download it once online, or set task.source=local task.path=<JSONL of rows {prompt, questions, "
            "answers}, SCOPE's schema>"
        ) from None
