"""retrobench: a research harness for decode-time KV selection (RetroAttention, Quest, InfLLM-style,
StreamingLLM, TOVA, oracle, full attention) on one shared decoding engine.

From Python, without the CLI::

    import retrobench
    out = retrobench.generate(model, tokenizer, ["..."], method="retro", window=4, budget=0.15)

(:func:`retrobench.api.generate`; imported on first use, so ``import retrobench`` stays light.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate"]


def __getattr__(name: str) -> Any:
    if name in ("generate", "make_method", "Output"):
        from retrobench import api

        return getattr(api, name)
    raise AttributeError(f"module 'retrobench' has no attribute {name!r}")
