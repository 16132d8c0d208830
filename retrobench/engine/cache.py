"""Engine-owned paged KV cache with exact per-page key min/max (Quest metadata).

Layout (glossary in methods/base.py): per layer, K and V pages ``[N_pages, P, H_kv, D]`` (keys
stored after RoPE) and per-page, per-KV-head channel ``kmin``/``kmax`` ``[N_pages, H_kv, D]``.
Each sequence b owns a page table row mapping its logical page i (positions [i*P, (i+1)*P)) to
a physical page. Pages are allocated per request, contiguously by default, so a sequence's keys
are a zero-copy view; any page table works (the accessors gather through it).

Min/max are recomputed from the stored keys of every page a write touches, over the page's
live slots only (slots below the sequence length and not evicted), so they stay exact after
appends, overwrites (RetroAttention) and evictions (StreamingLLM, TOVA) alike. Empty pages hold
kmin = +inf and kmax = -inf.
"""

from __future__ import annotations

import math

import torch


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
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.pages_per_seq = math.ceil(max_tokens / page_size)
        n_pages = batch_size * self.pages_per_seq
        shape = (num_layers, n_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        meta = (num_layers, n_pages, num_kv_heads, head_dim)
        self.kmin = torch.full(meta, float("inf"), dtype=dtype, device=device)
        self.kmax = torch.full(meta, float("-inf"), dtype=dtype, device=device)
        # Per-sequence page table: logical page -> physical page (contiguous allocation).
        self.page_table = torch.arange(n_pages, device=device).view(batch_size, self.pages_per_seq)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Live slots per layer and sequence (False once evicted); positions >= length are never live.
        self.live = torch.zeros(
            num_layers, batch_size, self.pages_per_seq * page_size, dtype=torch.bool, device=device
        )
        self._contiguous = True
        self._slot_offsets = torch.arange(page_size, device=device)
        self._inf = torch.tensor(float("inf"), dtype=dtype, device=device)

    # ---- bookkeeping ---------------------------------------------------------------------
    def _rows(self, positions: torch.Tensor, seqs: torch.Tensor | None) -> list[int]:
        return list(range(positions.shape[0])) if seqs is None else [int(s) for s in seqs]

    def reserve(self, positions: torch.Tensor, seqs: torch.Tensor | None = None) -> None:
        """Extend sequence lengths to cover ``positions [B', S]`` before a forward writes them.

        Row i of ``positions`` belongs to sequence ``seqs[i]`` (default: row i is sequence i), so a
        forward may step any subset of the batch.
        """
        top = int(positions.max()) + 1
        if top > self.max_tokens:
            raise ValueError(f"position {top - 1} exceeds the cache capacity of {self.max_tokens} tokens")
        for i, b in enumerate(self._rows(positions, seqs)):
            self.lengths[b] = max(int(self.lengths[b]), int(positions[i].max()) + 1)
            self.live[:, b, positions[i]] = True

    def evict(self, b: int, positions: torch.Tensor, layers: list[int] | None = None) -> None:
        """Free the KV of ``positions [K]`` of sequence ``b`` in ``layers`` (default: every layer)."""
        if positions.numel() == 0:
            return
        pages = torch.unique(positions // self.page_size)
        for layer in range(self.num_layers) if layers is None else layers:
            self.live[layer, b, positions] = False
            self._refresh_meta(layer, b, pages)

    def resident_tokens(self) -> torch.Tensor:
        """``[B]`` live KV tokens per sequence, averaged over layers (fp32)."""
        return self.live.sum(dim=2).float().mean(dim=0)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    # ---- writes -----------------------------------------------------------------------------
    def write(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: torch.Tensor | None = None
    ) -> None:
        """Store ``k, v [B', H_kv, S, D]`` at ``positions [B', S]`` (append or overwrite); refresh metadata."""
        P = self.page_size
        for i, b in enumerate(self._rows(positions, seqs)):
            pos = positions[i]
            phys = self.page_table[b, pos // P]
            slot = pos % P
            self.k[layer, phys, slot] = k[i].transpose(0, 1).to(self.k.dtype)
            self.v[layer, phys, slot] = v[i].transpose(0, 1).to(self.v.dtype)
            if pos.numel() == 1:  # decode: one page, no sort
                self._refresh_meta(layer, b, pos // P)
            else:
                self._refresh_meta(layer, b, torch.unique(pos // P))

    def _refresh_meta(self, layer: int, b: int, logical_pages: torch.Tensor) -> None:
        """Recompute kmin/kmax of ``logical_pages`` of sequence ``b`` from the live slots (exact)."""
        P = self.page_size
        phys = self.page_table[b, logical_pages]
        keys = self.k[layer, phys]  # [n, P, H_kv, D]
        slots = logical_pages.unsqueeze(1) * P + self._slot_offsets  # [n, P]
        live = self.live[layer, b][slots] & (slots < self.lengths[b])
        mask = live[:, :, None, None]
        self.kmin[layer, phys] = torch.where(mask, keys, self._inf).amin(dim=1)
        self.kmax[layer, phys] = torch.where(mask, keys, -self._inf).amax(dim=1)

    # ---- reads --------------------------------------------------------------------------------
    def num_pages(self, b: int, end: int | None = None) -> int:
        end = int(self.lengths[b]) if end is None else end
        return math.ceil(end / self.page_size)

    def _gather(self, pool: torch.Tensor, layer: int, b: int, end: int) -> torch.Tensor:
        n = self.num_pages(b, end)
        if self._contiguous:
            start = int(self.page_table[b, 0])
            flat = pool[layer, start : start + n]
        else:
            flat = pool[layer, self.page_table[b, :n]]
        return flat.reshape(n * self.page_size, self.num_kv_heads, self.head_dim)[:end]

    def keys(self, layer: int, b: int, end: int | None = None) -> torch.Tensor:
        """``[T, H_kv, D]`` keys of positions [0, end) of sequence ``b`` (a view when pages are contiguous)."""
        return self._gather(self.k, layer, b, int(self.lengths[b]) if end is None else end)

    def values(self, layer: int, b: int, end: int | None = None) -> torch.Tensor:
        return self._gather(self.v, layer, b, int(self.lengths[b]) if end is None else end)

    def live_mask(self, layer: int, b: int, end: int | None = None) -> torch.Tensor:
        """``[T]`` bool: which of positions [0, end) of sequence ``b`` hold live (not evicted) KV in ``layer``."""
        end = int(self.lengths[b]) if end is None else end
        return self.live[layer, b, :end]

    def page_meta(self, layer: int, b: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``kmin, kmax [n_pages, H_kv, D]`` of the pages covering positions [0, end) of sequence ``b``."""
        n = self.num_pages(b, end)
        phys = self.page_table[b, :n]
        return self.kmin[layer, phys], self.kmax[layer, phys]

    def remap(self, page_table: torch.Tensor) -> None:
        """Install a non-contiguous page table (tests use this to prove accessors go through it)."""
        self.page_table = page_table.to(self.page_table.device)
        self._contiguous = False
