"""Decoding rules: greedy, or seeded temperature / top-p sampling of the next token from its logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrobench.methods.base import ConfigError


@dataclass(frozen=True)
class Sampling:
    """Decoding rule: ``temperature == 0`` is greedy; otherwise seeded temperature / top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"engine.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"engine.top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from ``logits [V]``."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
