"""The attention function retrobench registers through transformers' attention interface.

transformers' own modules compute Q/K/V and apply RoPE; instead of its KV cache (the engine
passes ``past_key_values=None``) they call this function with the post-RoPE query, key and value
of the current forward's tokens. It writes K/V into the engine's paged cache at the forward's
positions (append, or overwrite for re-run earlier positions; page min/max refreshed for methods
that read them) through the kernel ops, and lets the method attend. After the last layer of a
decode step it folds the step's accounting. The per-forward context travels as the keyword
argument ``rb`` that transformers forwards untouched from ``model(...)`` down to the attention
call, so nothing global is mutated per request; the same function serves both backends, eager
and inside a CUDA graph, and the fused layers (``retrobench/engine/layers.py``) call its body,
:func:`attend`, directly.

Registering is idempotent: the name ``retrobench`` maps to the same pure function every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from retrobench.methods.base import Forward, Method

ATTN_IMPLEMENTATION = "retrobench"


@dataclass(eq=False)
class Call:
    """What the attention function receives as ``rb``: the method and the forward's context.

    ``probes``: when not None (eager decode steps only), per sparse layer the current query's
    mass recall and output error against dense attention, ``[B]`` each.
    """

    method: Method
    fwd: Forward
    probes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)


def retrobench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rb: Call | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, S, D]``, ``key/value [B, H_kv, S, D]`` -> ``([B, S, H, D], None)``."""
    if rb is None:
        raise RuntimeError("the retrobench attention implementation must be driven by retrobench.engine.Engine")
    return attend(module.layer_idx, query, key, value, rb), None


def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rb: Call) -> torch.Tensor:
    """Layer ``layer``'s attention for one forward: write K/V, let the method attend, fold accounting.

    ``query [B, H, S, D]``, ``key/value [B, H_kv, S, D]`` (post-RoPE) -> ``[B, S, H, D]``. Both the
    transformers path (:func:`retrobench_attention`) and the fused layers call it.
    """
    method, fwd = rb.method, rb.fwd
    c, ops = fwd.cache, fwd.ops
    slots = fwd.derived("kv_slots", lambda: torch.gather(c.token_table().long(), 1, fwd.pos))  # once per forward
    ops.write_kv(c.k[layer], c.v[layer], c.page_table, fwd.pos, key, value, slots=slots)
    if method.needs_page_meta:
        ops.update_page_minmax(c.k[layer], c.kmin[layer], c.kmax[layer], c.page_table, fwd.pos, fwd.ends)
    if fwd.phase == "prefill":
        out, lse = method.prefill(layer, query, fwd)
    else:
        out, lse = method.decode(layer, query, fwd)
        if rb.probes is not None and not method.is_dense_layer(layer):
            recall, error = rb.probes[layer] = probe_dense(layer, query, out, lse, fwd)
            fwd.acct.add_layers({"mass_recall": recall.unsqueeze(0), "attn_out_rel_err": error.unsqueeze(0)})
        if layer == fwd.spec.num_layers - 1:
            fwd.acct.step({**method.end_step(fwd), "context": fwd.ends.float()})
    return out.transpose(1, 2).contiguous()


def probe_dense(
    layer: int, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, fwd: Forward
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fidelity of the current query's attention against dense attention over every key written so far.

    Mass recall = the share of the dense softmax mass inside what the method attended, which is
    ``exp(lse_method - lse_dense)`` (the method's LSE covers a subset of the dense keys), averaged
    over heads; output error = ``||o_method - o_dense|| / ||o_dense||`` over heads and channels.
    Evicted keys count as keys of the dense reference (the cache keeps their values).
    Returns two ``[B]`` tensors.
    """
    c = fwd.cache
    pages = fwd.all_pages().expand(-1, c.num_kv_heads, -1)
    dense_out, dense_lse = fwd.ops.sparse_attention(
        query[:, :, -1:], c.k[layer], c.v[layer], c.page_table, pages, fwd.pos[:, -1:], fwd.scaling,
        num_units=fwd.n_pages,
    )  # fmt: skip
    recall = torch.exp(lse[:, :, -1] - dense_lse[:, :, 0]).mean(dim=1)
    diff = (out[:, :, -1].float() - dense_out[:, :, 0].float()).flatten(1).norm(dim=1)
    error = diff / dense_out[:, :, 0].float().flatten(1).norm(dim=1).clamp_min(1e-30)
    return recall, error


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The engine masks inside the attention function; transformers need not build a mask."""
    return


def register() -> str:
    """Register the attention function and its (empty) mask builder; returns the implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, retrobench_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
