"""Engine-owned paged KV cache with exact per-page key min/max (Quest metadata).

Layout (glossary in methods/base.py): per layer, K and V pages ``[N_pages, P, H_kv, D]`` (keys
stored after RoPE) and per-page, per-KV-head channel ``kmin``/``kmax`` ``[N_pages, H_kv, D]`` (only
for methods that read them). Every op takes the pages through their strides, so the storage
behind that shape is free: ``layout="token"`` stores it as is (a token's heads side by side: one
write a token; the GPU default), ``layout="head"`` stores ``[H_kv, N_pages * P, D]`` and exposes the
same shape as a strided view (the CPU default): with each sequence's pages in order, a sequence's
keys of one head are then one contiguous ``[T, D]`` block, which CPU SDPA reads more than twice as
fast as the token-major rows (measured on the 2-core CPU, smollm2 decode at 2K: 23.7 against
10.1 ms a step of SDPA, the latter transformers' contiguous cache). Each sequence b owns a page table row ``[n_max]`` (int32) mapping its
logical page i (positions [i*P, (i+1)*P)) to a physical page; pages are allocated per request,
contiguously by default, but every access goes through the table (tests remap it).

Writes go through the kernel ops (``write_kv``, ``update_page_minmax``: min/max recomputed from the
stored keys of every page a write touches, so they stay exact after appends and RetroAttention's
overwrites); empty pages hold kmin = +inf and kmax = -inf. Liveness after eviction is method
state (StreamingLLM, TOVA), not the cache's.
"""

from __future__ import annotations

import math

import torch


#: Storage orders of the K/V pools (see the module docstring).
LAYOUTS = ("token", "head")


class PagedKVCache:
    """Paged K/V storage for ``batch_size`` sequences of up to ``max_tokens`` tokens each."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_tokens: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        page_meta: bool = True,
        layout: str | None = None,
    ) -> None:
        layout = layout or ("head" if torch.device(device).type == "cpu" else "token")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.pages_per_seq = math.ceil(max_tokens / page_size)
        n_pages = batch_size * self.pages_per_seq
        self.k, self.v = (self._pool(n_pages, dtype, device) for _ in range(2))
        meta = (num_layers, n_pages, num_kv_heads, head_dim)
        self.kmin = torch.full(meta, float("inf"), dtype=dtype, device=device) if page_meta else None
        self.kmax = torch.full(meta, float("-inf"), dtype=dtype, device=device) if page_meta else None
        self.page_table = torch.arange(n_pages, dtype=torch.int32, device=device).view(batch_size, self.pages_per_seq)
        self._token_table: torch.Tensor | None = None

    def _pool(self, n_pages: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Zeroed ``[L, N_pages, P, H_kv, D]`` in this cache's layout."""
        L, P, H_kv, D = self.num_layers, self.page_size, self.num_kv_heads, self.head_dim
        if self.layout == "token":
            return torch.zeros(L, n_pages, P, H_kv, D, dtype=dtype, device=device)
        return torch.zeros(L, H_kv, n_pages, P, D, dtype=dtype, device=device).permute(0, 2, 3, 1, 4)

    @property
    def capacity(self) -> int:
        """Positions per sequence: ``pages_per_seq * P``."""
        return self.pages_per_seq * self.page_size

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    # ---- views for the kernel ops ------------------------------------------------------------------
    def token_table(self) -> torch.Tensor:
        """``[B, capacity]`` int32: position -> physical token slot (page_table[t // P] * P + t % P)."""
        if self._token_table is None:
            P = self.page_size
            slots = torch.arange(P, dtype=torch.int32, device=self.page_table.device)
            self._token_table = (self.page_table.unsqueeze(-1) * P + slots).reshape(self.batch_size, -1).contiguous()
        return self._token_table

    def token_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, table)`` of ``layer`` as one-token pages: ``[N_pages * P, 1, H_kv, D]`` and ``[B, capacity]``."""
        shape = (-1, 1, self.num_kv_heads, self.head_dim)
        return self.k[layer].view(shape), self.v[layer].view(shape), self.token_table()

    def copy_sequence(self, b: int, src: PagedKVCache, a: int) -> None:
        """Copy every page of ``src``'s sequence ``a`` (K, V, page min/max) into sequence ``b`` here;
        both caches hold the same pages per sequence (continuous batching)."""
        if src.pages_per_seq != self.pages_per_seq:
            raise ValueError(f"pages per sequence differ: {src.pages_per_seq} vs {self.pages_per_seq}")
        mine, theirs = self.page_table[b].long(), src.page_table[a].long()
        for pool, other in ((self.k, src.k), (self.v, src.v), (self.kmin, src.kmin), (self.kmax, src.kmax)):
            if pool is not None:
                pool[:, mine] = other[:, theirs]

    def remap(self, page_table: torch.Tensor) -> None:
        """Install another page table (tests use this to prove every access goes through it)."""
        self.page_table = page_table.to(device=self.page_table.device, dtype=torch.int32).contiguous()
        self._token_table = None

    # ---- reads (eager helpers: methods' upkeep and tests) -------------------------------------------
    def gather_keys(self, b: int, positions: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """``[L', n, H_kv, D]`` keys of sequence ``b`` at ``positions [n]`` in ``layers``."""
        pos = positions.long()
        phys = self.page_table[b].long()[pos // self.page_size]
        return self.k[layers][:, phys, pos % self.page_size]

    def gather_keys_batch(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """``[B, n, H_kv, D]`` keys of every sequence at ``positions [n]`` in ``layer``."""
        pos = positions.long()
        phys = self.page_table.long()[:, pos // self.page_size]  # [B, n]
        return self.k[layer][phys, pos % self.page_size]

    def _span(self, pool: torch.Tensor, layer: int, b: int, end: int) -> torch.Tensor:
        n = math.ceil(end / self.page_size)
        flat = pool[layer, self.page_table[b, :n].long()]
        return flat.reshape(n * self.page_size, self.num_kv_heads, self.head_dim)[:end]

    def keys(self, layer: int, b: int, end: int) -> torch.Tensor:
        """``[end, H_kv, D]`` keys of positions [0, end) of sequence ``b`` (a copy, through the page table)."""
        return self._span(self.k, layer, b, end)

    def values(self, layer: int, b: int, end: int) -> torch.Tensor:
        return self._span(self.v, layer, b, end)

    def page_meta(self, layer: int, b: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``kmin, kmax [n_pages, H_kv, D]`` of the pages covering positions [0, end) of sequence ``b``."""
        if self.kmin is None:
            raise ValueError("this cache keeps no page min/max (the method does not read them)")
        phys = self.page_table[b, : math.ceil(end / self.page_size)].long()
        return self.kmin[layer, phys], self.kmax[layer, phys]
