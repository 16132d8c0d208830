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

    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attend_dense(layer, q, fwd, need_lse=fwd.probing)  # the LSE only feeds the probes

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        """Every sparse (here: non-``dense_layers``) layer attends the whole context."""
        sparse = fwd.spec.num_layers - self.dense_layers
        if sparse > 0:
            fwd.acct.add_layers({"attended_kv": (fwd.pos[:, -1] + 1).float().expand(sparse, -1)})
        return super().end_step(fwd)
