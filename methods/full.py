"""Full attention: every query attends to every live key at or before its position.

The baseline every selection method is compared with, and what any budget covering the whole
context must reproduce exactly. Budget accounting: attended KV tokens = all live keys visible to
the query; no pages are selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.kernels.attention_ref import dense_attention_ref
from retrobench.methods.base import AttnResult, Method, StepInfo


@dataclass
class FullMethod(Method):
    """Dense attention over all resident KV (``dense_layers`` is irrelevant and defaults to 0)."""

    name: ClassVar[str] = "full"

    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        outs, lses, attended = [], [], []
        for b in range(q.shape[0]):
            pos = info.positions[b]
            end = int(pos.max()) + 1
            live = cache.live_mask(layer, b, end)
            out, lse = dense_attention_ref(
                q[b], cache.keys(layer, b, end), cache.values(layer, b, end), pos, info.scaling, key_mask=live
            )
            outs.append(out)
            lses.append(lse)
            visible = torch.cumsum(live.to(torch.float32), 0)[pos]  # live keys at or before each query
            attended.append(visible)
        return AttnResult(out=torch.stack(outs), lse=torch.stack(lses), attended=torch.stack(attended))
