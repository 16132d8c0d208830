"""Perplexity over position: teacher-forced NLL of a long text through a method's decode path.

The paper's Figure 1b measures how a sparse-attention method's language-modelling quality decays
with the number of generated tokens. This task reproduces it without sampling: the run layer
(:mod:`retrobench.runner.modes`) prefills ``context_tokens`` of a text, then *teacher-forces* the next
``eval_tokens`` tokens through the method's decode loop (one decode step per token, exactly as in
generation), and hands the per-token NLL to :meth:`PerplexityTask.score_nll`. NLL is reported per
position bucket of ``bucket_tokens`` generated tokens, and as a ratio to the full-attention NLL
of the same tokens (computed once per sample and cached in the result store by the run layer).

The task never touches the engine: it only builds token windows and does arithmetic on the NLL.

Sources (``task.source``):
    stdlib: the standard library's docstrings (:mod:`retrobench.inputs.texts`), on every machine, offline.
    file:   any local UTF-8 text file (``task.path``).
    pg19:   PG-19's test split (``deepmind/pg19`` through ``datasets``), one window per book.
Samples of ``stdlib`` and ``file`` are consecutive, non-overlapping windows from the start of the
text, so they are deterministic and independent of the seed; ``first_window`` skips windows, so
one study can split its windows over several processes (sample ids name the absolute window, so
runs pair by id).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample, Task, TextTokenizer

SOURCES = ("stdlib", "file", "pg19")
PG19 = "deepmind/pg19"
PARQUET_REVISION = "refs/convert/parquet"  # the Hub's parquet export (datasets >= 4 runs no scripts)


@dataclass
class PerplexityTask(Task):
    """Teacher-forced perplexity by generated-position bucket.

    Settings (Hydra keys ``task.*``):
        source: ``stdlib`` (default, offline), ``file`` or ``pg19``.
        path: the text file of ``source: file``.
        context_tokens: prompt length in tokens (>= 1), the tokenizer's own prefix (e.g. BOS) included.
        eval_tokens: teacher-forced tokens scored per sample (>= 1); ``max_new_tokens`` is set to it.
        bucket_tokens: generated positions per NLL bucket (>= 1); the last bucket may be shorter.
        num_samples: windows (samples) per run.
        first_window: index of the first window (stdlib / file: skip that many windows; pg19: books).
    """

    name: ClassVar[str] = "ppl"
    version: ClassVar[str] = "1"
    mode: ClassVar[str] = "teacher_forced"

    source: str = "stdlib"
    path: str | None = None
    context_tokens: int = 3072
    eval_tokens: int = 1024
    bucket_tokens: int = 128
    first_window: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("context_tokens", "eval_tokens", "bucket_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"task.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.first_window, int) or isinstance(self.first_window, bool) or self.first_window < 0:
            raise ConfigError(f"task.first_window must be an integer >= 0, got {self.first_window!r}")
        self.max_new_tokens = self.eval_tokens  # what the context check and the engine see
        super().__post_init__()
        if self.source not in SOURCES:
            raise ConfigError(
                f"task.source={self.source!r} is not supported; allowed: {', '.join(SOURCES)}"
            )
        if self.stop:
            raise ConfigError(
                "task.stop is not used by task=ppl (teacher forcing never stops); allowed: []"
            )
        if self.chat_template:
            raise ConfigError("task.chat_template=true is not supported by task=ppl (it scores raw text)")
        if self.source == "file":
            if not self.path:
                raise ConfigError("task.source=file needs task.path=<a UTF-8 text file>")
            if not Path(self.path).is_file():
                raise ConfigError(f"task.path={self.path} is not a file (task.source=file)")

    # ---- samples -----------------------------------------------------------------------------

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        """``num_samples`` windows of ``context_tokens + eval_tokens`` tokens (independent of ``seed``).

        ``meta["prompt_ids"]`` (the tokenizer's prefix, e.g. BOS, then text tokens) is what the
        engine prefills and ``meta["target_ids"]`` what it teacher-forces; ``prompt`` is the decoded
        prompt, for reading only (re-encoding text is not the identity).
        """
        prefix = _special_prefix(tokenizer)
        text_len = self.context_tokens - len(prefix)
        if text_len < 1:
            raise ConfigError(
                f"task.context_tokens={self.context_tokens} leaves no text after the tokenizer's "
                f"{len(prefix)} prefix token(s); raise task.context_tokens"
            )
        width = text_len + self.eval_tokens
        if self.source == "pg19":
            windows = self._pg19_windows(tokenizer, width)
        else:
            first = self.first_window
            ids = self._stream_tokens(tokenizer, (first + self.num_samples) * width)
            windows = [
                (f"offset {i * width}", ids[i * width : (i + 1) * width])
                for i in range(first, first + self.num_samples)
            ]
        out = []
        for i, (where, ids) in enumerate(windows, start=self.first_window):
            prompt_ids = [*prefix, *ids[:text_len]]
            out.append(
                Sample(
                    id=f"ppl-{self.source}-{i}",
                    prompt=tokenizer.decode(prompt_ids, skip_special_tokens=False),
                    reference={"source": self.source, "window": where},
                    meta={"prompt_ids": prompt_ids, "target_ids": list(ids[text_len:width])},
                )
            )
        return out

    def _stream_tokens(self, tokenizer: TextTokenizer, n: int) -> list[int]:
        if self.source == "stdlib":
            from retrobench.inputs.texts import stdlib_tokens

            try:
                return list(stdlib_tokens(tokenizer, n))
            except ValueError as exc:
                raise ConfigError(
                    f"task.source=stdlib: {exc}; lower task.num_samples or the lengths"
                ) from None
        text = Path(str(self.path)).read_text(encoding="utf-8", errors="replace")
        ids = _head_tokens(tokenizer, text, n)
        if ids is None:
            raise ConfigError(
                f"task.path={self.path} has only {len(tokenizer.encode(text, add_special_tokens=False))} tokens; "
                f"{n} needed ((first_window + num_samples) x (context_tokens + eval_tokens)); lower them or use a longer file"
            )
        return ids

    def _pg19_windows(self, tokenizer: TextTokenizer, width: int) -> list[tuple[str, list[int]]]:
        """The first ``width`` tokens of each of the first ``num_samples`` long-enough test books."""
        hint = "without network use source: file with task.path=<a local text file>"
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                f"task.source=pg19 loads {PG19} through the `datasets` package, which is not installed; {hint}"
            ) from None
        windows: list[tuple[str, list[int]]] = []
        try:
            try:
                books = datasets.load_dataset(PG19, split="test", streaming=True)
            except RuntimeError as exc:  # a script dataset under datasets >= 4: use the parquet export
                if "script" not in str(exc).lower():
                    raise
                books = datasets.load_dataset(PG19, split="test", streaming=True, revision=PARQUET_REVISION)
            for book in books:
                ids = _head_tokens(tokenizer, str(book.get("text", "")), width)
                if ids is not None:
                    windows.append((str(book.get("short_book_title", len(windows))), ids))
                if len(windows) == self.first_window + self.num_samples:
                    break
        except Exception as exc:  # noqa: BLE001 - offline, missing dataset, broken cache: one line
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"task.source=pg19 could not load the dataset {PG19} (test split): {reason}; {hint}"
            ) from None
        if len(windows) < self.first_window + self.num_samples:
            raise ConfigError(
                f"task.source=pg19: only {len(windows)} test books have {width} tokens; "
                "lower task.num_samples or task.first_window"
            )
        return windows[self.first_window :]

    # ---- scoring -----------------------------------------------------------------------------

    def bucket_bounds(self, n: int | None = None) -> list[tuple[int, int]]:
        """``[(start, end)]`` of the position buckets that partition ``n`` (default eval_tokens) tokens."""
        n = self.eval_tokens if n is None else n
        return [(s, min(n, s + self.bucket_tokens)) for s in range(0, n, self.bucket_tokens)]

    def score_nll(
        self, sample: Sample, nll: Sequence[float], reference_nll: Sequence[float] | None = None
    ) -> dict[str, float]:
        """Per-sample metrics from the per-token NLL (nats) of the teacher-forced tokens.

        Returns ``nll`` (mean), ``ppl`` = exp(nll), ``nll_bucket_<i>`` (mean NLL of generated
        positions ``[i*bucket_tokens, (i+1)*bucket_tokens)``), ``tokens`` and ``completion`` = 1.0
        (accuracy is not defined for perplexity and is omitted). With ``reference_nll`` (full
        attention on the same tokens) also ``nll_full``, ``ppl_ratio`` = exp(nll - nll_full) and
        ``nll_ratio_bucket_<i>`` = exp(bucket NLL - full bucket NLL), the per-bucket perplexity ratio.
        """
        values = [float(v) for v in nll]
        if not values:
            raise ValueError(f"sample {sample.id}: no NLL values to score")
        out: dict[str, float] = {"nll": _avg(values), "tokens": float(len(values)), "completion": 1.0}
        out["ppl"] = math.exp(out["nll"])
        buckets = self.bucket_bounds(len(values))
        for i, (a, b) in enumerate(buckets):
            out[f"nll_bucket_{i}"] = _avg(values[a:b])
        if reference_nll is not None:
            ref = [float(v) for v in reference_nll]
            if len(ref) != len(values):
                raise ValueError(
                    f"sample {sample.id}: {len(ref)} reference NLL values for {len(values)} tokens"
                )
            out["nll_full"] = _avg(ref)
            out["ppl_ratio"] = math.exp(out["nll"] - out["nll_full"])
            for i, (a, b) in enumerate(buckets):
                out[f"nll_ratio_bucket_{i}"] = math.exp(out[f"nll_bucket_{i}"] - _avg(ref[a:b]))
        return out

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        raise ConfigError(
            "task=ppl is scored from teacher-forced NLL (score_nll), not from generated text"
        )


# ---- helpers -------------------------------------------------------------------------------------


def _avg(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _special_prefix(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before any text (BOS for Llama-style tokenizers, nothing for GPT-2-style)."""
    try:
        return list(tokenizer.encode("", add_special_tokens=True))
    except TypeError:
        return []


def _head_tokens(tokenizer: TextTokenizer, text: str, n: int) -> list[int] | None:
    """The first ``n`` tokens of ``text`` (encoding a growing prefix of it), or None if it is shorter.

    A prefix is only trusted when it yields a margin of 64 tokens beyond ``n``, so the cut never
    changes the tokens kept; the whole text is encoded when no prefix does.
    """
    chars = 8 * n + 256
    while chars < len(text):
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) >= n + 64:
            return list(ids[:n])
        chars *= 2
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids[:n]) if len(ids) >= n else None
