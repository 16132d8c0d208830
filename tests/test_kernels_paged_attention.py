"""sparse_paged_attention (Triton) equals its reference on fresh random paged caches.

CPU: fp32/fp16 under TRITON_INTERPRET=1 at small, odd shapes. GPU (``-m gpu``): bf16 at Llama-8B
shapes, and the whole Quest decode pipeline captured in a CUDA graph (proves no host syncs).
Outputs are allocated poisoned (NaN) so an unwritten element fails; the output is checked to be
laid out as the layer's [B, S, H, D] (split or not), so the engine's transpose copies nothing. Every test draws a new seed
and prints it on failure (``KERNEL_TEST_SEED=<n>`` replays one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("triton")

from retrobench.kernels._testing import assert_close, fresh_seed, needs_kernel_device, poisoned_empty
from retrobench.kernels.paged_attention import (
    DEFAULT_LAUNCH,
    MANY_ROWS_LONG_SPLITS,
    launch_settings,
    reduce_rows,
    sparse_paged_attention,
    sparse_paged_attention_ref,
)

INT32_MAX = 2**31 - 1
# (atol, rtol) per dtype for out; lse is fp32 in both, from the same rounded inputs.
TOL_OUT = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
TOL_LSE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-4), torch.bfloat16: (1e-3, 1e-3)}



@dataclass
class Case:
    B: int = 2
    H: int = 4
    H_kv: int = 2
    S: int = 1
    D: int = 24
    P: int = 4
    lengths: tuple = (37, 20)
    select: str = "random"  # random | empty | full | one
    K: int = 6  # selection slots (random / one: padded with -1)
    key_mask: bool = False
    page_step: bool = False
    permuted: bool = True  # page table a random permutation of a larger pool
    strided_q: bool = False
    per_qhead: bool = False  # one list per query head (selection: q_head): H_sel = H
    num_units: bool = False  # lists compacted to the front, read only up to num_units (valid junk after)
    shared_mask: bool = False  # one key mask for every KV head (eviction liveness), expanded: stride 0
    token_view: bool = False  # the cache seen as one-token units (token-level selections)
    extra: dict = field(default_factory=dict)


CASES = {
    "mha-d24-s1-p4": Case(H=2, H_kv=2, S=1, D=24, P=4, lengths=(37, 20)),
    "gqa3-d40-s3-boundary": Case(H=6, H_kv=2, S=3, D=40, P=8, lengths=(45, 64)),
    "gqa4-kP-and-kP+1": Case(H=8, H_kv=2, S=1, D=32, P=16, lengths=(48, 49), K=3),
    "gqa8-d64-s3": Case(B=1, H=8, H_kv=1, S=3, D=64, P=4, lengths=(33,), K=5),
    "empty-selection": Case(H=6, H_kv=2, S=3, select="empty"),
    "full-selection": Case(H=8, H_kv=2, S=3, D=40, P=8, lengths=(53, 17), select="full"),
    "one-page": Case(H=6, H_kv=2, S=1, select="one"),
    "key-mask": Case(H=8, H_kv=2, S=3, D=40, P=8, lengths=(61, 30), key_mask=True),
    "page-step": Case(H=6, H_kv=2, S=3, D=24, P=4, lengths=(41, 26), page_step=True, K=8),
    "mask-and-step-full": Case(H=4, H_kv=1, S=3, P=8, lengths=(40, 33), select="full", key_mask=True, page_step=True),
    "contiguous-table": Case(H=4, H_kv=2, S=1, permuted=False),
    "page-larger-than-tile": Case(H=4, H_kv=2, S=3, D=24, P=64, lengths=(150, 65), K=3),
    "rows-over-one-block": Case(B=1, H=16, H_kv=1, S=5, D=16, P=8, lengths=(50,), K=5),
    "d80-strided-q": Case(B=1, H=6, H_kv=2, S=3, D=80, P=16, lengths=(70,), K=4, strided_q=True),
    "per-qhead-step": Case(H=6, H_kv=2, S=3, D=24, P=4, lengths=(41, 26), K=6, per_qhead=True, page_step=True),
    "num-units": Case(H=4, H_kv=2, S=2, D=24, P=8, lengths=(61, 30), K=6, num_units=True),
    "shared-mask-full": Case(H=8, H_kv=2, S=1, P=8, lengths=(53, 17), select="full", key_mask=True, shared_mask=True,
                             num_units=True),
    "tokens-step-qhead": Case(H=4, H_kv=2, S=2, D=16, P=4, lengths=(37, 22), K=24, token_view=True, page_step=True,
                              per_qhead=True, num_units=True),
}


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cpu"):
    B, H, H_kv, S, D, P = case.B, case.H, case.H_kv, case.S, case.D, case.P
    lengths = torch.tensor(case.lengths)
    n_max = math.ceil(int(lengths.max()) / P) + 1  # one spare logical page past every sequence
    n_pool = B * n_max + 3
    k_cache = torch.randn(n_pool, P, H_kv, D) * 1.5
    v_cache = torch.randn(n_pool, P, H_kv, D)
    phys = torch.randperm(n_pool)[: B * n_max] if case.permuted else torch.arange(B * n_max)
    page_table = phys.view(B, n_max).to(torch.int32)
    # slots at or past a sequence's length hold garbage that causality must hide
    for b in range(B):
        flat = page_table[b].long()
        keys = k_cache[flat].reshape(n_max * P, H_kv, D)
        keys[int(lengths[b]) :] = 30.0
        k_cache[flat] = keys.view(n_max, P, H_kv, D)
    if case.strided_q:
        q = torch.randn(B, S, H, D).transpose(1, 2)
    else:
        q = torch.randn(B, H, S, D)
    q_pos = torch.stack([torch.arange(int(t) - S, int(t)) for t in lengths]).to(torch.int32)
    if case.token_view:  # one-token units: the same bytes, a per-token table
        k_cache, v_cache = k_cache.view(-1, 1, H_kv, D), v_cache.view(-1, 1, H_kv, D)
        page_table = (page_table.unsqueeze(-1) * P + torch.arange(P, dtype=torch.int32)).view(B, -1)
        n_max, P = n_max * P, 1

    H_sel = H if case.per_qhead else H_kv
    n_units = [math.ceil(int(t) / P) for t in lengths]
    width = {"full": n_max, "empty": case.K, "one": case.K, "random": case.K}[case.select]
    pages = torch.full((B, H_sel, width), -1, dtype=torch.int32)
    counts = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        lists = []
        for h in range(H_sel):
            if case.select == "empty":
                chosen = torch.zeros(0, dtype=torch.long)
            elif case.select == "full":
                chosen = torch.randperm(n_units[b])
            elif case.select == "one":
                chosen = torch.tensor([n_units[b] - 1])
            else:
                chosen = torch.randperm(n_units[b])[: min(width - 1, n_units[b])]  # at least one -1 slot
            lists.append(chosen)
            if not case.num_units:
                slots = torch.randperm(width)[: len(chosen)]  # padding lands anywhere
                pages[b, h, slots] = chosen.to(torch.int32)
        if case.num_units:  # compact lists; past the count, valid units the kernel must ignore
            count = min(width, max(len(c) for c in lists) + b % 2)
            counts[b] = count
            for h, chosen in enumerate(lists):
                pages[b, h, : len(chosen)] = chosen.to(torch.int32)
                pages[b, h, count:] = torch.randint(0, n_units[b], (width - count,), dtype=torch.int32)

    key_mask = page_step = q_step = num_units = None
    if case.key_mask:
        key_mask = torch.rand(B, 1 if case.shared_mask else H_kv, n_max * P) < 0.7
        key_mask = key_mask.expand(B, H_kv, -1)
    if case.page_step:
        page_step = torch.randint(0, 4, (B, H_sel, n_max + 1), dtype=torch.int32)  # a spare dump column
        q_step = torch.randint(0, 5, (B, S), dtype=torch.int32)
        q_step[:, -1] = INT32_MAX  # the current query sees every selected page
    if case.num_units:
        num_units = counts
    to = {"device": device}
    args = (
        q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to),
        page_table.to(**to), pages.to(**to), q_pos.to(**to), D**-0.5,
    )  # fmt: skip
    kwargs = {
        "key_mask": None if key_mask is None else key_mask.to(**to),
        "page_step": None if page_step is None else page_step.to(**to),
        "q_step": None if q_step is None else q_step.to(**to),
        "num_units": None if num_units is None else num_units.to(**to),
    }
    return args, kwargs


def check(case: Case, dtype: torch.dtype, num_splits, device: str = "cpu", config: dict | None = None) -> None:
    seed = fresh_seed()
    args, kwargs = make_inputs(case, dtype, device)
    expected_out, expected_lse = sparse_paged_attention_ref(*args, **kwargs)
    with poisoned_empty():
        out, lse = sparse_paged_attention(*args, **kwargs, num_splits=num_splits, config=config)
    assert out.dtype == args[0].dtype and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), "out must be a view of [B, S, H, D] memory (the layer's layout)"
    assert_close("lse", lse, expected_lse, *TOL_LSE[dtype], seed=seed)
    assert_close("out", out, expected_out, *TOL_OUT[dtype], seed=seed)
    if case.select == "empty":
        assert torch.all(out == 0) and torch.all(lse == float("-inf")), f"seed {seed}"
    else:
        assert torch.isfinite(lse).any(), f"degenerate case: nothing visible (seed {seed})"


@pytest.mark.parametrize("num_splits", [1, 3], ids=["splits1", "splits3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, dtype: torch.dtype, num_splits: int) -> None:
    needs_kernel_device("cpu")
    check(CASES[name], dtype, num_splits)


def test_launch_settings_take_short_tiles_only_for_many_rows_and_long_splits() -> None:
    assert launch_settings(16, 4096) == DEFAULT_LAUNCH
    assert launch_settings(32, 4 * DEFAULT_LAUNCH["block_n"] - 1) == DEFAULT_LAUNCH
    assert launch_settings(32, 4 * DEFAULT_LAUNCH["block_n"]) == {**DEFAULT_LAUNCH, **MANY_ROWS_LONG_SPLITS}
    assert launch_settings(17, 4096) == {**DEFAULT_LAUNCH, **MANY_ROWS_LONG_SPLITS}
    assert launch_settings(33, 4096) == DEFAULT_LAUNCH  # prefill-sized row counts: not measured, the default
    assert launch_settings(32, 4096, {"block_n": 16})["block_n"] == 16  # config wins


def test_many_rows_long_splits_default_matches_reference() -> None:
    """32 rows a program, one split of 256 keys: the default launch takes MANY_ROWS_LONG_SPLITS (under
    the interpreter its 32-key tile is the default's too: this checks the path, the GPU case the tile)."""
    needs_kernel_device("cpu")
    case = Case(H=8, H_kv=2, S=8, D=16, P=16, lengths=(300, 260), K=16, page_step=True)
    assert launch_settings(4 * 8, 16 * 16) == {**DEFAULT_LAUNCH, **MANY_ROWS_LONG_SPLITS}
    check(case, torch.float32, 1)


def test_default_splits_and_more_splits_than_tiles() -> None:
    needs_kernel_device("cpu")
    case = Case(H=6, H_kv=2, S=3, D=24, P=4, lengths=(41, 26), K=8)
    check(case, torch.float32, None)
    check(case, torch.float32, 7)  # most splits hold no tile: they must still write (0, -inf)


def test_reduce_rows_fill_two_waves_within_the_tile() -> None:
    assert reduce_rows(256, 5, 128, 264) == 1  # quest, batch 8: one row a program already fills the device
    assert reduce_rows(2048, 5, 128, 264) == 4  # retro w = 8, batch 8: 512 programs (a power of two <= 7.8)
    assert reduce_rows(2048, 64, 128, 8) == 1  # 64 splits x 128 fill the tile with one row
    assert reduce_rows(10, 3, 24, 264) == 1


@pytest.mark.parametrize("reduce_rows_", [1, 4, 16])
def test_split_reduce_over_several_rows_a_program(reduce_rows_: int) -> None:
    """36 query rows (2 x 6 heads x 3) in programs of 1, 4 and 16 rows: the last program is partial."""
    needs_kernel_device("cpu")
    case = Case(H=6, H_kv=2, S=3, D=24, P=4, lengths=(41, 26), K=8, page_step=True)
    check(case, torch.float32, 3, config={"reduce_rows": reduce_rows_})


def test_hidden_keys_do_not_leak() -> None:
    """Keys hidden by every mask at once change nothing: poison them with huge values and NaN in V."""
    needs_kernel_device("cpu")
    seed = fresh_seed()
    case = Case(H=4, H_kv=2, S=3, D=24, P=4, lengths=(30, 22), K=5, key_mask=True)
    args, kwargs = make_inputs(case, torch.float32)
    _, k_cache, v_cache, page_table, pages = args[:5]
    expected = sparse_paged_attention_ref(*args, **kwargs)
    # every page that no KV head of its sequence selected gets NaN keys and values
    for b in range(case.B):
        chosen = set(pages[b].flatten().tolist()) - {-1}
        for lp in range(page_table.shape[1]):
            if lp not in chosen:
                k_cache[page_table[b, lp]] = float("nan")
                v_cache[page_table[b, lp]] = float("nan")
        # and every key the key mask hides, per KV head
        hidden = ~kwargs["key_mask"][b]  # [H_kv, T_max]
        for kv, t in hidden.nonzero().tolist():
            k_cache[page_table[b, t // case.P], t % case.P, kv] = float("nan")
            v_cache[page_table[b, t // case.P], t % case.P, kv] = float("nan")
    with poisoned_empty():
        out, lse = sparse_paged_attention(*args, **kwargs, num_splits=2)
    assert_close("lse", lse, expected[1], *TOL_LSE[torch.float32], seed=seed)
    assert_close("out", out, expected[0], *TOL_OUT[torch.float32], seed=seed)


def test_rejects_bad_shapes() -> None:
    args, _ = make_inputs(Case(), torch.float32)
    q, k_cache, v_cache, page_table, pages, q_pos, scaling = args
    with pytest.raises(ValueError, match="power of two"):
        sparse_paged_attention(q, k_cache[:, :3], v_cache[:, :3], page_table, pages, q_pos, scaling)
    with pytest.raises(ValueError, match="pages must be"):
        sparse_paged_attention(q, k_cache, v_cache, page_table, pages[:, :1], q_pos, scaling)
    with pytest.raises(ValueError, match="come together"):
        sparse_paged_attention(q, k_cache, v_cache, page_table, pages, q_pos, scaling, page_step=pages)


# ---- GPU (real Triton, bf16, Llama-3.1-8B shapes) ----------------------------------------------
GPU_CASES = {
    "llama8b-s1": Case(B=2, H=32, H_kv=8, S=1, D=128, P=16, lengths=(4096, 3001), K=128),
    "llama8b-s3-step": Case(B=2, H=32, H_kv=8, S=3, D=128, P=16, lengths=(4096, 4097), K=128, page_step=True),
    # 32 rows a program, the shape MANY_ROWS_LONG_SPLITS is measured for
    "llama8b-s8-step": Case(B=2, H=32, H_kv=8, S=8, D=128, P=16, lengths=(4096, 4100), K=128, page_step=True),
    "llama8b-mask-full": Case(B=1, H=32, H_kv=8, S=2, D=128, P=16, lengths=(2049,), select="full", key_mask=True),
    "qwen-d80-gqa4": Case(B=3, H=16, H_kv=4, S=1, D=80, P=32, lengths=(999, 2048, 31), K=40),
    "llama8b-qhead-units": Case(B=2, H=32, H_kv=8, S=2, D=128, P=16, lengths=(4096, 3001), K=128, per_qhead=True,
                                num_units=True, page_step=True),
    "llama8b-tokens-mask": Case(B=1, H=32, H_kv=8, S=1, D=128, P=16, lengths=(2049,), K=700, token_view=True,
                                key_mask=True, shared_mask=True, num_units=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5], ids=["splits-auto", "splits1", "splits5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "name", list(GPU_CASES) + ["gqa3-d40-s3-boundary", "page-larger-than-tile", "empty-selection", "tokens-step-qhead"]
)
def test_matches_reference_gpu(name: str, dtype: torch.dtype, num_splits) -> None:
    needs_kernel_device("cuda")
    check(GPU_CASES.get(name) or CASES[name], dtype, num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduce_rows_", [2, 8])
def test_split_reduce_over_several_rows_matches_reference_gpu(reduce_rows_: int) -> None:
    needs_kernel_device("cuda")
    check(GPU_CASES["llama8b-s8-step"], torch.bfloat16, 5, device="cuda", config={"reduce_rows": reduce_rows_})


@pytest.mark.parametrize("num_splits", [1, 5], ids=["splits1", "splits5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_default_tiles_at_many_rows_match_reference_gpu(dtype: torch.dtype, num_splits) -> None:
    """32 rows a program with the 64-key tiles (the default takes MANY_ROWS_LONG_SPLITS there)."""
    needs_kernel_device("cuda")
    check(GPU_CASES["llama8b-s8-step"], dtype, num_splits, device="cuda", config=DEFAULT_LAUNCH)


@pytest.mark.gpu
def test_quest_decode_step_captures_in_cuda_graph() -> None:
    """Page scores, selection, attention and the metadata refresh replay from a CUDA graph (no host syncs)."""
    needs_kernel_device("cuda")
    from retrobench.kernels.page_meta import update_page_minmax
    from retrobench.kernels.quest import quest_page_scores
    from retrobench.kernels.topk import topk_forced

    seed = fresh_seed()
    case = Case(B=2, H=32, H_kv=8, S=1, D=128, P=16, lengths=(4096, 3001), K=16)
    args, _ = make_inputs(case, torch.bfloat16, "cuda")
    q, k_cache, v_cache, page_table, _, q_pos, scaling = args
    N, P, H_kv, D = k_cache.shape
    kmin = torch.full((N, H_kv, D), float("inf"), dtype=k_cache.dtype, device="cuda")
    kmax = torch.full_like(kmin, float("-inf"))
    lengths = q_pos[:, -1].long() + 1
    every = torch.arange(page_table.shape[1] * P, device="cuda").view(1, -1).expand(case.B, -1)
    update_page_minmax(k_cache, kmin, kmax, page_table, torch.where(every < lengths[:, None], every, -1), lengths)
    n_pages = ((lengths + P - 1) // P).to(torch.int32)
    k = torch.full((case.B,), 12, dtype=torch.int32, device="cuda")

    def step():
        update_page_minmax(k_cache, kmin, kmax, page_table, q_pos, lengths)
        scores = quest_page_scores(q[:, :, -1], kmin, kmax, page_table, n_pages)
        pages = topk_forced(scores, k, case.K, n_pages - 1)
        return sparse_paged_attention(q, k_cache, v_cache, page_table, pages, q_pos, scaling, num_units=k)

    expected = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert_close("graph out", captured[0], expected[0], 0, 0, seed=seed)
    assert_close("graph lse", captured[1], expected[1], 0, 0, seed=seed)


def test_shared_lists_expanded_over_heads_take_the_same_values() -> None:
    """A ``[B, 1, K]`` list expanded over KV heads (stride 0, as dense attention and StreamingLLM pass
    it) gives what the same list copied per head gives: the reference's shared-list gather, and the kernel."""
    seed = fresh_seed()
    case = Case(H=6, H_kv=3, S=2, D=24, P=4, lengths=(41, 26), select="full", key_mask=True, shared_mask=True)
    args, kwargs = make_inputs(case, torch.float32)
    q, k_cache, v_cache, table, pages, q_pos, scaling = args
    shared = pages[:, :1].expand(-1, case.H_kv, -1)
    per_head = shared.contiguous()
    want = sparse_paged_attention_ref(q, k_cache, v_cache, table, per_head, q_pos, scaling, **kwargs)
    got = sparse_paged_attention_ref(q, k_cache, v_cache, table, shared, q_pos, scaling, **kwargs)
    assert_close("out", got[0], want[0], 1e-6, 1e-6, seed=seed)
    assert_close("lse", got[1], want[1], 1e-6, 1e-6, seed=seed)
    if triton_usable_here():
        kernel = sparse_paged_attention(q, k_cache, v_cache, table, shared, q_pos, scaling, **kwargs)
        assert_close("kernel out", kernel[0], want[0], *TOL_OUT[torch.float32], seed=seed)


def triton_usable_here() -> bool:
    from retrobench.kernels._triton import triton_usable

    return triton_usable(torch.empty(0))
