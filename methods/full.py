"""Full attention: every query attends to every live key at or before its position.

The baseline every selection method is compared with, and what any budget covering the whole
context must reproduce exactly. Budget accounting: attended KV tokens = all live keys visible to
the query; no pages are selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.methods.base import AttnResult, Method, StepInfo, attend_live


@dataclass
class FullMethod(Method):
    """Dense attention over all resident KV (``dense_layers`` is irrelevant and defaults to 0)."""

    name: ClassVar[str] = "full"

    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        return attend_live(layer, q, cache, info)
