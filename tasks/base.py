"""The task contract: a task builds prompts and scores generated text, nothing more.

A task knows no method and no engine. It is a small dataclass whose fields are its Hydra keys
(``conf/task/<name>.yaml``), validated in ``__post_init__``. ``samples()`` is deterministic for
a given seed and tokenizer, so a resumed run sees exactly the same samples. ``score()`` returns
per-sample metrics; every task reports at least ``accuracy`` and ``completion`` (share of the
expected answers present in the output), both in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from retrobench.conf import ConfigError  # noqa: F401 - the one config error; tasks raise it



class TextTokenizer(Protocol):
    """What a task may use of a tokenizer: turning text into ids and back (to control lengths)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class Sample:
    """One prompt and what is needed to score the answer to it (JSON-serialisable)."""

    id: str
    prompt: str
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """Base class of every task.

    Shared settings:
        num_samples: samples per run.
        max_new_tokens: generation cap per sample.
        stop: stop strings (generation ends when the text ends with one of them).
        chat_template: wrap the prompt in the model's chat template (when the tokenizer has one).
    """

    name: ClassVar[str] = "base"
    version: ClassVar[str] = "0"
    mode: ClassVar[str] = "generate"  # how the run layer drives it: generate | teacher_forced | fidelity

    num_samples: int = 4
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    chat_template: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"task.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"task.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        self.stop = list(self.stop)

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        raise NotImplementedError

    def workload(self) -> tuple[int, int]:
        """``(samples, tokens decoded per sample at most)`` of one run, from the settings alone (no
        data read): what ``make reproduce-plan`` turns into GPU time."""
        return self.num_samples, int(self.max_new_tokens)

    def settings(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"task": self.name, "task_version": self.version, **asdict(self)}
