"""The attention function retrobench registers through transformers' attention interface.

transformers' own modules compute Q/K/V and apply RoPE; instead of its KV cache (the engine
passes ``past_key_values=None``) they call this function with the post-RoPE query, key and value
of the current forward's tokens. It writes K/V into the engine's paged cache at the forward's
positions (append, or overwrite for re-run earlier positions) and lets the method attend. The
per-forward context travels as the keyword argument ``rb`` that transformers forwards untouched
from ``model(...)`` down to the attention call, so nothing global is mutated per request.

Registering is idempotent: the name ``retrobench`` maps to the same pure function every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from retrobench.engine.cache import PagedKVCache
from retrobench.kernels.attention_ref import dense_attention_ref
from retrobench.methods.base import Method, StepInfo

ATTN_IMPLEMENTATION = "retrobench"
FAST_IMPLEMENTATION = "retrobench_triton"  # engine.backend=triton (retrobench/engine/fast.py)


@dataclass
class ForwardContext:
    """Everything one model forward needs to know; created by the engine per forward."""

    cache: PagedKVCache
    method: Method
    state: Any
    info: StepInfo
    probe: bool = False  # compare the current query's attention with dense attention this step
    # Filled by the hook: per sparse layer (layer >= dense_layers), the accounting tensors.
    attended: list[torch.Tensor] = field(default_factory=list)
    pages: list[torch.Tensor] = field(default_factory=list)
    # With ``probe``: per sparse layer, [B] mass recall and [B] attention-output relative error.
    recall: dict[int, torch.Tensor] = field(default_factory=dict)
    out_error: dict[int, torch.Tensor] = field(default_factory=dict)


def retrobench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rb: ForwardContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, S, D]``, ``key/value [B, H_kv, S, D]`` -> ``([B, S, H, D], None)``."""
    if rb is None:
        raise RuntimeError("the retrobench attention implementation must be driven by retrobench.engine.Engine")
    layer = module.layer_idx
    rb.cache.write(layer, rb.info.positions, key, value)
    if rb.info.phase == "prefill":
        result = rb.method.prefill(layer, query, rb.cache, rb.info, rb.state)
    else:
        result = rb.method.decode(layer, query, rb.cache, rb.info, rb.state)
        if not rb.method.is_dense_layer(layer):
            if result.attended is not None:
                rb.attended.append(result.attended)
            if result.pages is not None:
                rb.pages.append(result.pages)
            if rb.probe:
                rb.recall[layer], rb.out_error[layer] = probe_dense(layer, query, result, rb)
    return result.out.transpose(1, 2).contiguous(), None


def probe_dense(layer: int, query: torch.Tensor, result: Any, rb: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Fidelity of the current query's attention against dense attention over every key written so far.

    Mass recall = the share of the dense softmax mass inside what the method attended, which is
    ``exp(lse_method - lse_dense)`` (the method's LSE covers a subset of the dense keys), averaged
    over heads; output error = ``||o_method - o_dense|| / ||o_dense||`` over heads and channels.
    Evicted keys count as keys of the dense reference (the reference cache keeps their values).
    Returns two ``[B]`` tensors.
    """
    recalls, errors = [], []
    for b in range(query.shape[0]):
        pos = rb.info.positions[b, -1:]
        end = int(pos) + 1
        k, v = rb.cache.keys(layer, b, end), rb.cache.values(layer, b, end)
        dense_out, dense_lse = dense_attention_ref(query[b, :, -1:], k, v, pos, rb.info.scaling)
        recalls.append(torch.exp(result.lse[b, :, -1] - dense_lse[:, 0]).mean())
        diff = result.out[b, :, -1].float() - dense_out[:, 0].float()
        errors.append(diff.norm() / dense_out[:, 0].float().norm().clamp_min(1e-30))
    return torch.stack(recalls), torch.stack(errors)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The engine masks inside the attention function; transformers need not build a mask."""
    return


def register() -> str:
    """Register the attention function and its (empty) mask builder; returns the implementation name."""
    from retrobench.engine.fast import fast_attention

    AttentionInterface.register(ATTN_IMPLEMENTATION, retrobench_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    AttentionInterface.register(FAST_IMPLEMENTATION, fast_attention)
    AttentionMaskInterface.register(FAST_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
