"""Fidelity to full attention: how closely a method tracks the full-attention output, token by token.

Accuracy on a task says whether a method's answers are right; fidelity says *why* they drift. The
fidelity task wraps any generating task (``source_task``, default LongGenBench) and uses its
prompts. The run layer (:mod:`retrobench.runner.modes`) generates the full-attention greedy output of
each prompt once (cached in the result store), then teacher-forces the method along exactly those
tokens with ``probe_every``-step probes of each sparse layer's attention against dense attention,
and hands logits and probes to :meth:`FidelityTask.score_fidelity`. Forcing the same tokens keeps
the comparison position-aligned even after the method's own greedy output would have diverged.

Per sample it reports top-1 agreement, mean KL(full || method), the first divergence position,
attention-output relative error and attention-mass recall (overall and per sparse layer). The
task never touches the engine: it builds prompts through the wrapped task and does arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from retrobench.conf import ConfigError
from retrobench.tasks.base import Sample, Task, TextTokenizer

NOT_WRAPPABLE = ("fidelity", "ppl")  # tasks that do not generate from a prompt


def task_conf_dir() -> Path:
    """``conf/task`` of the installed package."""
    from retrobench.conf import conf_dir

    return conf_dir() / "task"


def load_task(name: str, overrides: Mapping[str, Any] | None = None) -> Task:
    """Instantiate the task of ``conf/task/<name>.yaml`` with ``overrides`` applied to its keys."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    folder = task_conf_dir()
    allowed = sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in NOT_WRAPPABLE)
    if not isinstance(name, str) or name in NOT_WRAPPABLE or not (folder / f"{name}.yaml").is_file():
        raise ConfigError(
            f"task.source_task={name} is not a generating task; allowed: {', '.join(allowed)}"
        )
    data = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"), resolve=True)
    assert isinstance(data, dict)
    target = get_class(str(data.pop("_target_")))
    known = {f.name for f in fields(target) if f.init} if is_dataclass(target) else set(data)
    for key in overrides or {}:
        if key not in known:
            raise ConfigError(
                f"task.source_options.{key} is not a setting of task {name}; allowed: {', '.join(sorted(known))}"
            )
    try:
        return target(**{**data, **dict(overrides or {})})
    except ConfigError as exc:  # name the key as the user sets it
        raise ConfigError(str(exc).replace("task.", "task.source_options.")) from None


@dataclass
class FidelityTask(Task):
    """Teacher-forced fidelity to full attention along the full-attention greedy output.

    Settings (Hydra keys ``task.*``):
        source_task: the task whose prompts are used (a ``conf/task/<name>.yaml`` that generates).
        source_options: overrides of the wrapped task's settings, a mapping or null (on the command
            line ``task.source_options='{context_tokens: 2048}'``); the wrapped ``num_samples``
            defaults to this task's; ``stop`` and ``chat_template`` are set here too.
        max_new_tokens: length cap of the full-attention greedy reference (it also stops at EOS
            and at the wrapped task's stop strings).
        probe_every: probe the attention of every sparse layer against dense attention every k-th
            decode step (>= 1; the probe costs a dense read, so long runs use k > 1).
        num_samples: samples per run (the first ones of the wrapped task).
    """

    name: ClassVar[str] = "fidelity"
    version: ClassVar[str] = "1"
    mode: ClassVar[str] = "fidelity"

    source_task: str = "longgenbench"
    source_options: dict[str, Any] | None = None
    probe_every: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.probe_every, int)
            or isinstance(self.probe_every, bool)
            or self.probe_every < 1
        ):
            raise ConfigError(f"task.probe_every must be an integer >= 1, got {self.probe_every!r}")
        if self.stop or self.chat_template:
            raise ConfigError(
                "task.stop / task.chat_template of task=fidelity come from the wrapped task; "
                "set them as task.source_options.stop / task.source_options.chat_template"
            )
        if self.source_options is None:
            self.source_options = {}
        if not isinstance(self.source_options, Mapping):
            raise ConfigError(f"task.source_options must be a mapping, got {self.source_options!r}")
        self.source_options = dict(self.source_options)
        self.wrapped: Task = load_task(
            self.source_task, {"num_samples": self.num_samples, **self.source_options}
        )
        self.stop = list(self.wrapped.stop)
        self.chat_template = bool(self.wrapped.chat_template)

    @property
    def context_tokens(self) -> int | None:
        """The wrapped task's prompt length (for the run's context check), if it declares one."""
        return getattr(self.wrapped, "context_tokens", None)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "source_settings": self.wrapped.settings()}

    def samples(self, tokenizer: TextTokenizer, seed: int) -> list[Sample]:
        """The wrapped task's first ``num_samples`` samples (same ids, prompts and references)."""
        return list(self.wrapped.samples(tokenizer, seed))[: self.num_samples]

    def score(self, sample: Sample, output: str) -> dict[str, float]:
        raise ConfigError(
            "task=fidelity is scored from logits and probes (score_fidelity), not from text"
        )

    def score_fidelity(
        self,
        sample: Sample,
        ref_tokens: Sequence[int],
        ref_logits: Any,
        logits: Any,
        probes: Sequence[Mapping[str, Any]],
    ) -> dict[str, float]:
        """Per-sample fidelity of a method teacher-forced along the full-attention greedy output.

        ``ref_tokens [N]`` / ``ref_logits [N, V]``: the full-attention greedy tokens and the logits
        that chose them (stored as float16); ``logits [N, V]``: the method's logits at the same
        positions; ``probes``: ``Generation.probes`` (per probed step, per sparse layer ``recall``
        and ``out_error``).

        Returns ``top1_agreement`` (share of positions where the method's argmax is the full
        greedy token), ``first_divergence`` (first such position that differs; N if none),
        ``kl_full_method`` (mean KL(full || method), nats, float64; the method's logits are rounded
        to the reference's dtype first, so full attention scores exactly 0), ``attn_out_rel_err``
        and ``mass_recall`` (means over probes and sparse layers) with per-layer
        ``attn_out_rel_err_layer_<l>`` / ``mass_recall_layer_<l>`` (omitted when nothing was
        probed), ``tokens`` = N and ``completion`` = 1.0.
        """
        import torch

        from retrobench.store.metrics import kl_per_position

        ref = torch.as_tensor(list(ref_tokens), dtype=torch.long)
        n = int(ref.numel())
        if n == 0:
            raise ValueError(f"sample {sample.id}: empty full-attention reference")
        ref_logits, logits = torch.as_tensor(ref_logits), torch.as_tensor(logits)
        if logits.shape[0] != n or ref_logits.shape != logits.shape:
            raise ValueError(
                f"sample {sample.id}: logits {tuple(logits.shape)} vs reference {tuple(ref_logits.shape)}, {n} tokens"
            )
        match = (logits.argmax(-1).cpu() == ref).tolist()
        out: dict[str, float] = {
            "top1_agreement": sum(match) / n,
            "first_divergence": float(match.index(False) if False in match else n),
            "kl_full_method": float(kl_per_position(ref_logits, logits.to(ref_logits.dtype)).mean()),
            "tokens": float(n),
            "completion": 1.0,
        }
        for name, key in (("attn_out_rel_err", "out_error"), ("mass_recall", "recall")):
            per_layer: dict[int, list[float]] = {}
            for probe in probes:
                for layer, value in (probe.get(key) or {}).items():
                    per_layer.setdefault(int(layer), []).append(float(value))
            if per_layer:
                everything = [v for values in per_layer.values() for v in values]
                out[name] = math.fsum(everything) / len(everything)
                for layer in sorted(per_layer):
                    out[f"{name}_layer_{layer}"] = math.fsum(per_layer[layer]) / len(per_layer[layer])
        return out
