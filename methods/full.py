"""Full attention: every query attends to every live key at or before its position.

The baseline every selection method is compared with, and what any budget covering the whole
context must reproduce exactly. Budget accounting: attended KV tokens = all keys visible to the
current query (the context); no pages are selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from retrobench.methods.base import Forward, Method, attend_dense


@dataclass
class FullMethod(Method):
    """Dense attention over all resident KV (``dense_layers`` is irrelevant and defaults to 0)."""

    name: ClassVar[str] = "full"

    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = attend_dense(layer, q, fwd)
        if not self.is_dense_layer(layer):
            fwd.acct.layer(layer, {"attended_kv": (fwd.pos[:, -1] + 1).float()})
        return out, lse
