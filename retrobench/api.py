"""Use from Python: any method on your own transformers model and tokenizer, without the CLI.

``retrobench.generate(model, tokenizer, prompts, method="retro", window=4, budget=0.15)`` runs each
prompt through the same engine, method and kernel ops as ``python -m retrobench run`` and returns
the generated texts with their per-sample accounting and timing. Methods are built from their
``conf/method/<name>.yaml`` defaults (the CLI's), so a setting not given here has the value a run
would have; ``budget`` takes the one-key form (an int is tokens, a float a fraction of the context).
Greedy by default; with ``temperature > 0`` each prompt is sampled with a seed derived from ``seed``
and its index, so a prompt's result does not depend on the others.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from retrobench.methods.base import ConfigError, Method


@dataclass
class Output:
    """One prompt's generation.

    ``stats``: the engine's per-sample means over decode steps (``exposure``, ``attended_kv``,
    ``resident_kv``, ``pages_selected``, ``kv_bytes``, ``peak_memory_bytes``, ...).
    ``tpot_s``: median decode-step time; ``tokens_per_s``: decode speed (prefill excluded).
    """

    prompt: str
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    tpot_s: float | None
    tokens_per_s: float | None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def exposure(self) -> float | None:
        return self.stats.get("exposure")

    @property
    def attended_kv(self) -> float | None:
        return self.stats.get("attended_kv")


def make_method(method: str | Method = "retro", budget: int | float | None = None, **settings: Any) -> Method:
    """A method by name with its ``conf/method/<name>.yaml`` defaults, ``budget`` (int: tokens, float:
    a fraction) and any other settings; a Method instance is returned as is (no settings allowed)."""
    if isinstance(method, Method):
        if budget is not None or settings:
            raise ConfigError("settings go into the Method you pass, or pass method=<name> with settings")
        return method
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from retrobench.conf import conf_dir
    from retrobench.runner.launch import group_options

    names = group_options("method")
    if method not in names:
        raise ConfigError(f"method={method} is not a method; allowed: {', '.join(names)}")
    cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
    if budget is not None:
        if "budget" not in cfg:
            raise ConfigError(f"budget does not apply to method={method} (it has no budget)")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ConfigError(f"budget must be an int (tokens) or a float (fraction of the context), got {budget!r}")
        cfg.budget = {"tokens": budget, "fraction": None} if isinstance(budget, int) else {"tokens": None, "fraction": budget}
    allowed = [k for k in cfg if k != "_target_"]
    for key, value in settings.items():
        if key not in cfg:
            raise ConfigError(f"{key} is not a setting of method={method}; allowed: {', '.join(allowed)}")
        cfg[key] = value
    return instantiate(cfg, _convert_="all")


def default_backend(model: Any) -> str:
    """``triton`` for a model on a CUDA device when triton is installed, else ``torch``."""
    import importlib.util

    device = next(model.parameters()).device
    return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"


def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    method: str | Method = "retro",
    *,
    budget: int | float | None = None,
    max_new_tokens: int = 256,
    chat: bool = False,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    backend: str | None = None,
    page_size: int = 16,
    prefill_chunk: int | str = "auto",
    batch_size: int = 1,
    **settings: Any,
) -> list[Output]:
    """Generate after each prompt with ``method`` (a name of ``conf/method/`` or a Method).

    Parameters
    ----------
    model, tokenizer: a transformers causal LM with RoPE attention and its tokenizer.
    prompts: one prompt or a list; ``chat=True`` wraps each in the tokenizer's chat template.
    method, budget, **settings: the method and its settings (``window=4``, ``base="quest"``,
        ``selection="q_head"`` ...), defaults from ``conf/method/<name>.yaml``.
    max_new_tokens, stop: generation stops at the model's EOS, at a stop string, or after this many.
    temperature, top_p, seed: greedy at temperature 0; else seeded sampling per prompt.
    backend: ``torch`` | ``triton`` (default: triton on a CUDA model when available).
    batch_size: prompts decoded at once (continuous batching); the outputs do not depend on it.

    Returns
    -------
    One :class:`Output` per prompt, in order.
    """
    from retrobench.engine import Engine, Job, Sampling
    from retrobench.inputs.models import eos_token_ids
    from retrobench.runner.modes import encode_prompt, sample_seed

    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    engine = Engine(model, make_method(method, budget, **settings), page_size=page_size,
                    prefill_chunk=prefill_chunk, backend=backend or default_backend(model))  # fmt: skip
    jobs = [
        Job(encode_prompt(tokenizer, p, chat), max_new_tokens, Sampling(temperature, top_p, sample_seed(seed, str(i))))
        for i, p in enumerate(items)
    ]
    outputs: list[Output | None] = [None] * len(items)

    def done(i: int, gen: Any) -> None:
        steps = gen.step_times_s
        outputs[i] = Output(
            prompt=items[i],
            text=tokenizer.decode(gen.tokens, skip_special_tokens=True),
            tokens=list(gen.tokens),
            finish_reason=gen.finish_reason,
            prompt_tokens=gen.prompt_tokens,
            ttft_s=gen.ttft_s,
            tpot_s=statistics.median(steps) if steps else None,
            tokens_per_s=len(steps) / sum(steps) if steps and sum(steps) > 0 else None,
            stats=dict(gen.stats),
        )

    engine.generate_batch(jobs, batch_size, done, eos_token_ids=eos_token_ids(model, tokenizer),
                          stop_strings=tuple(stop), decode=tokenizer.decode)  # fmt: skip
    return [o for o in outputs if o is not None]


__all__ = ["Output", "default_backend", "generate", "make_method"]
