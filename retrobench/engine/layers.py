"""Llama-family decoder layers as two pure functions over fused weights (the compiled fast path).

transformers' modules run one decode step of a layer as ~50 kernels: three Q/K/V projections,
RMSNorm as six elementwise kernels, RoPE as a dozen, the gated MLP as five. For architectures whose
layers are exactly ``h + attn(norm(h))`` then ``h + mlp(norm(h))`` with RoPE and a SiLU-gated MLP
(:data:`SUPPORTED`: Llama, Mistral, Qwen2), the engine can run each layer as

* :func:`pre_attention` ``(h) -> q, k, v``: RMSNorm, one projection over the concatenated Q/K/V
  weights, RoPE;
* the engine's attention (:func:`retrobench.engine.hook.attend`, the same function the
  transformers path calls: cache write, the method, accounting);
* :func:`post_attention` ``(h, o) -> h``: output projection + residual, RMSNorm, one projection over
  the concatenated gate/up weights, SiLU(gate) * up, down projection + residual;

and put the two functions through ``torch.compile`` (``engine.compile``): inductor fuses the
elementwise work into a few kernels and every layer shares the same compiled code (the weights
are inputs). The attention between them stays outside the compiled code: the kernel ops, the
method and its state run exactly as on the transformers path.

The concatenated weights are the model's own storage: ``fuse_rows`` makes the q/k/v (gate/up)
parameters views of one tensor, so no weight is held twice and the model's own modules still
work. The uncompiled functions equal transformers' modules op for op (same order, same dtypes);
tests compare the two paths' logits.

Shapes: B sequences, S tokens per sequence, H query heads, H_kv KV heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: ``config.model_type`` values whose decoder layers :func:`pre_attention` / :func:`post_attention` reproduce.
SUPPORTED = ("llama", "mistral", "qwen2")


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: in fp32, then back to the input dtype, times the weight."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [B, H, S, D]`` with ``cos, sin [B, 1, S, D]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def pre_attention(
    h: torch.Tensor, norm_w: torch.Tensor, eps: float, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``h [B, S, hidden]`` -> ``q [B, H, S, D]``, ``k, v [B, H_kv, S, D]`` (q and k rotated)."""
    B, S, _ = h.shape
    qkv = F.linear(rms_norm(h, norm_w, eps), wqkv, bqkv)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(B, S, heads, head_dim).transpose(1, 2)
    k = k.view(B, S, kv_heads, head_dim).transpose(1, 2)
    v = v.view(B, S, kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def post_attention(
    h: torch.Tensor, o: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
    wgu: torch.Tensor, wdown: torch.Tensor, inter: int,
) -> torch.Tensor:  # fmt: skip
    """``h [B, S, hidden]``, attention output ``o [B, S, H * D]`` -> the layer's output ``[B, S, hidden]``."""
    h = h + F.linear(o, wo, bo)
    gate, up = F.linear(rms_norm(h, norm_w, eps), wgu).split([inter, inter], dim=-1)
    return h + F.linear(F.silu(gate) * up, wdown)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, Q/K/V and gate/up concatenated (views of the model's storage)."""

    norm_in: torch.Tensor
    eps_in: float
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    norm_post: torch.Tensor
    eps_post: float
    wgu: torch.Tensor
    wdown: torch.Tensor


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model``'s layers cannot run as :func:`pre_attention` / :func:`post_attention` (None: they can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        return f"model_type {cfg.model_type!r} (fused layers support {', '.join(SUPPORTED)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (fused layers need silu)"
    if getattr(cfg, "mlp_bias", False):
        return "mlp_bias (fused layers have no MLP bias)"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the Llama module layout (model.embed_tokens/layers/norm/rotary_emb)"
    attn = inner.layers[0].self_attn
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        return "per-head Q/K norms (fused layers have none)"
    return None


def fuse_rows(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """One ``[sum of out_features, in_features]`` weight whose row blocks are the modules' weights.

    When the weights already lie back to back in one storage (a model fused before) the result is
    a view of it; otherwise the weights are concatenated once and every module's parameter is
    re-pointed to its block of the new tensor (the old storage is freed with the last reference).
    """
    ws = [m.weight for m in modules]
    step = ws[0].element_size()
    back_to_back = all(w.is_contiguous() for w in ws) and all(
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + a.numel() * step
        for a, b in zip(ws, ws[1:])
    )
    rows, cols = sum(w.shape[0] for w in ws), ws[0].shape[1]
    if back_to_back:
        return ws[0].detach().as_strided((rows, cols), (cols, 1))
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in ws], dim=0)
    lo = 0
    for m, w in zip(modules, ws):
        m.weight = torch.nn.Parameter(fused[lo : lo + w.shape[0]], requires_grad=w.requires_grad)
        lo += w.shape[0]
    return fused


def _bias(modules: list[torch.nn.Linear]) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                      for b, m in zip(biases, modules)])  # fmt: skip


class FusedLayers:
    """A Llama-family model's forward as embed -> per layer (pre, attend, post) -> norm -> head.

    ``forward(ids [B, S], pos [B, S], attend, compiled)`` returns the last token's fp32 logits
    ``[B, V]``; ``attend(layer, q, k, v) -> [B, S, H, D]`` is the engine's attention. ``compiled``
    picks the ``torch.compile``d pair of layer functions (built lazily, once per instance).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fused layers cannot run this model: {reason}")
        cfg, inner = model.config, model.model
        self.model, self.inner = model, inner
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.inter = cfg.intermediate_size
        self.layers = [self._weights(layer) for layer in inner.layers[: cfg.num_hidden_layers]]
        self._compiled: tuple[Callable, Callable] | None = None

    @staticmethod
    def _weights(layer: torch.nn.Module) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        return LayerWeights(
            norm_in=layer.input_layernorm.weight.detach(), eps_in=float(layer.input_layernorm.variance_epsilon),
            wqkv=fuse_rows(qkv), bqkv=_bias(qkv), wo=a.o_proj.weight.detach(),
            bo=a.o_proj.bias.detach() if a.o_proj.bias is not None else None,
            norm_post=layer.post_attention_layernorm.weight.detach(),
            eps_post=float(layer.post_attention_layernorm.variance_epsilon),
            wgu=fuse_rows([m.gate_proj, m.up_proj]), wdown=m.down_proj.weight.detach(),
        )  # fmt: skip

    def functions(self, compiled: bool) -> tuple[Callable, Callable]:
        if not compiled:
            return pre_attention, post_attention
        if self._compiled is None:
            self._compiled = (torch.compile(pre_attention, fullgraph=True), torch.compile(post_attention, fullgraph=True))
        return self._compiled

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, attend: Callable[..., torch.Tensor], compiled: bool = False
    ) -> torch.Tensor:
        pre, post = self.functions(compiled)
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, position_ids=pos)
        B, S, _ = h.shape
        for i, w in enumerate(self.layers):
            q, k, v = pre(h, w.norm_in, w.eps_in, w.wqkv, w.bqkv, cos, sin, self.heads, self.kv_heads, self.head_dim)
            o = attend(i, q, k, v).reshape(B, S, -1)
            h = post(h, o, w.wo, w.bo, w.norm_post, w.eps_post, w.wgu, w.wdown, self.inter)
        last = self.inner.norm(h[:, -1:])
        return self.model.lm_head(last)[:, -1].float()
