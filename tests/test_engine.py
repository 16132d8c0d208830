"""The engine with full attention against transformers' own greedy ``generate``, plus the engine's
own guarantees: state hygiene, multi-token overwrite steps, teacher forcing, sampling, stopping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from retrobench.engine import Engine, Sampling
from retrobench.methods.base import ConfigError
from retrobench.methods.full import FullMethod

TIE = 1e-4  # top-1/top-2 logit gap below which a greedy flip is a float tie, not a bug


def prompt_of(tokenizer, model, length: int, seed: int = 0) -> list[int]:
    """A natural-text prompt of exactly ``length`` tokens (random ids for byte tokenizers)."""
    if getattr(tokenizer, "chat_template", None) is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size - 4, (length,), generator=gen).tolist()
    text = (
        "The river ran past the old mill, and the miller counted sacks of grain every morning. "
        "In spring the water rose, and the children watched the wheel turn faster than before. "
    ) * (1 + length // 20)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= length
    return ids[:length]


def hf_greedy(model, prompt: list[int], n: int):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits)[:, 0].float()


def assert_same_greedy(ours_tokens, ours_logits, ref_tokens, ref_logits, rtol=1e-4):
    """Same tokens, logits equal to ``rtol`` relative (to the largest logit magnitude) up to any tie."""
    n = len(ref_tokens)
    first = next((i for i in range(n) if ours_tokens[i] != ref_tokens[i]), n)
    if first < n:  # only acceptable at a genuine float tie of the reference
        top2 = ref_logits[first].topk(2).values
        assert float(top2[0] - top2[1]) < TIE, f"token {first} differs with top-2 gap {float(top2[0] - top2[1])}"
    err = (ours_logits[: first + 1] - ref_logits[: first + 1]).abs().max() / ref_logits[: first + 1].abs().max()
    assert float(err) < rtol, f"logits differ by {float(err):.2e} relative"
    return first


@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000])
def test_full_matches_hf_generate_tiny(tiny_random, length):
    model, tok = tiny_random
    prompt = prompt_of(tok, model, length, seed=length)
    ref_tokens, ref_logits = hf_greedy(model, prompt, 256)
    gen = Engine(model, FullMethod(), page_size=16, prefill_chunk=384).generate(prompt, 256, keep_logits=True)
    assert assert_same_greedy(gen.tokens, gen.logits, ref_tokens, ref_logits) == 256
    assert gen.finish_reason == "length" and len(gen.tokens) == 256


def hf_forward_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' own logits for every generated position, from one dense forward over prompt + tokens.

    If its argmax at each position is the token our engine emitted there, transformers' greedy
    ``generate`` emits the same tokens (greedy decoding is a function of the prefix), so this checks
    token-for-token equality at the cost of one forward instead of 256 sequential steps.
    """
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits[len(prompt) - 1 :]


def test_full_matches_hf_generate_smollm2(smollm2):
    """One real ``generate`` comparison on the GQA model (the other lengths use the forward check below),
    and the forward check on the same 256 tokens (the 17-token case of the lengths below)."""
    model, tok = smollm2
    prompt = prompt_of(tok, model, 17)
    ref_tokens, ref_logits = hf_greedy(model, prompt, 256)
    gen = Engine(model, FullMethod(), page_size=16, prefill_chunk=512).generate(prompt, 256, keep_logits=True)
    assert assert_same_greedy(gen.tokens, gen.logits, ref_tokens, ref_logits) > 200
    fwd_logits = hf_forward_logits(model, prompt, gen.tokens)
    fwd_tokens = [int(t) for t in fwd_logits.argmax(-1)]
    assert assert_same_greedy(gen.tokens, gen.logits, fwd_tokens, fwd_logits) == 256


@pytest.mark.parametrize("length", [1, 15, 16, 1000])  # 17: in the test above
def test_full_matches_hf_greedy_decisions_smollm2(smollm2, length):
    """128 tokens (8 pages of 16) past prompts that end before, on and after a page boundary, and past a
    2-chunk prefill (1000 > prefill_chunk 512); tiny_random runs 256 at these lengths against generate."""
    model, tok = smollm2
    prompt = prompt_of(tok, model, length)
    gen = Engine(model, FullMethod(), page_size=16, prefill_chunk=512).generate(prompt, 128, keep_logits=True)
    ref_logits = hf_forward_logits(model, prompt, gen.tokens)
    ref_tokens = [int(t) for t in ref_logits.argmax(-1)]
    assert assert_same_greedy(gen.tokens, gen.logits, ref_tokens, ref_logits) == 128


def test_state_hygiene(tiny_random):
    """Sample A then B on one engine equals B on a fresh engine, bit for bit."""
    model, tok = tiny_random
    a, b = prompt_of(tok, model, 40, seed=1), prompt_of(tok, model, 23, seed=2)
    engine = Engine(model, FullMethod())
    engine.generate(a, 32)
    b_after_a = engine.generate(b, 32, keep_logits=True)
    b_fresh = Engine(model, FullMethod()).generate(b, 32, keep_logits=True)
    assert b_after_a.tokens == b_fresh.tokens
    assert torch.equal(b_after_a.logits, b_fresh.logits)


@dataclass
class RerunFull(FullMethod):
    """Test double: full attention that re-runs the last ``w - 1`` generated tokens every step
    (keeping page min/max, so their refresh under overwrites is checked too)."""

    name: ClassVar[str] = "rerun_full"
    needs_page_meta: ClassVar[bool] = True
    w: int = 4

    @property
    def reprocess_window(self) -> int:
        return self.w


def test_multi_token_overwrite_changes_nothing_under_full_attention(tiny_random):
    """Re-running earlier positions with identical inputs overwrites their K/V with the same values."""
    model, tok = tiny_random
    prompt = prompt_of(tok, model, 37, seed=3)
    base = Engine(model, FullMethod()).generate(prompt, 48, keep_logits=True)
    rerun = Engine(model, RerunFull(w=4)).generate(prompt, 48, keep_logits=True)
    assert rerun.tokens == base.tokens
    # a 4-row GEMM rounds differently from a 1-row one: equal to float tolerance, not bit for bit
    scale = float(base.logits.abs().max())
    torch.testing.assert_close(rerun.logits, base.logits, rtol=1e-5, atol=1e-5 * scale)

    # And directly: one overwrite step leaves every layer's K/V and page metadata unchanged.
    engine = Engine(model, RerunFull(w=4))
    req = engine.new_request(64)
    ids = torch.tensor([prompt])
    engine.prefill(req, ids)
    gen_ids = torch.tensor([[5, 6, 7]])
    for i in range(3):  # append three generated tokens one at a time
        engine.forward(req, gen_ids[:, i : i + 1], torch.tensor([[37 + i]]), "decode", i)
    k0, v0 = req.cache.k.clone(), req.cache.v.clone()
    kmin0, kmax0 = req.cache.kmin.clone(), req.cache.kmax.clone()
    engine.forward(req, gen_ids, torch.tensor([[37, 38, 39]]), "decode", 3)  # overwrite all three
    for now, before in ((req.cache.k, k0), (req.cache.v, v0), (req.cache.kmin, kmin0), (req.cache.kmax, kmax0)):
        finite = torch.isfinite(before)
        assert torch.equal(finite, torch.isfinite(now))
        torch.testing.assert_close(now[finite], before[finite], rtol=1e-5, atol=1e-5)


def test_teacher_forcing_reproduces_greedy_logits(tiny_random):
    model, tok = tiny_random
    prompt = prompt_of(tok, model, 30, seed=4)
    engine = Engine(model, FullMethod())
    greedy = engine.generate(prompt, 40, keep_logits=True)
    forced = engine.generate(prompt, 0, teacher_tokens=greedy.tokens, keep_logits=True)
    assert forced.tokens == greedy.tokens and forced.finish_reason == "teacher"
    assert torch.equal(forced.logits, greedy.logits)


def test_seeded_sampling(tiny_random):
    model, tok = tiny_random
    prompt = prompt_of(tok, model, 20, seed=5)
    engine = Engine(model, FullMethod())
    s0 = engine.generate(prompt, 40, sampling=Sampling(temperature=1.0, top_p=0.9, seed=0)).tokens
    s0_again = engine.generate(prompt, 40, sampling=Sampling(temperature=1.0, top_p=0.9, seed=0)).tokens
    s1 = engine.generate(prompt, 40, sampling=Sampling(temperature=1.0, top_p=0.9, seed=1)).tokens
    assert s0 == s0_again and s0 != s1


def test_eos_stop_strings_and_length(tiny_random):
    model, tok = tiny_random
    prompt = prompt_of(tok, model, 20, seed=6)
    engine = Engine(model, FullMethod())
    free = engine.generate(prompt, 30)
    eos = free.tokens[10]
    stopped = engine.generate(prompt, 30, eos_token_ids=[eos])
    assert stopped.finish_reason == "eos" and stopped.tokens == free.tokens[: free.tokens.index(eos) + 1]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731 - a transparent test decoder
    stop = f"<{free.tokens[5]}><{free.tokens[6]}>"
    by_string = engine.generate(prompt, 30, stop_strings=[stop], decode=decode)
    assert by_string.finish_reason == "stop" and stop in decode(by_string.tokens)
    assert len(by_string.tokens) <= 7
    assert len(engine.generate(prompt, 3).tokens) == 3


def test_bad_engine_settings(tiny_random):
    model, _ = tiny_random
    with pytest.raises(ConfigError, match="engine.page_size"):
        Engine(model, FullMethod(), page_size=12)
    with pytest.raises(ConfigError, match="engine.backend"):
        Engine(model, FullMethod(), backend="cuda-magic")
    with pytest.raises(ConfigError, match="context"):
        Engine(model, FullMethod()).generate([1, 2, 3], model.config.max_position_embeddings)


def test_probe_full_is_exact_and_tight_quest_is_not(tiny_random):
    from retrobench.methods.quest import QuestMethod

    model, tok = tiny_random
    ids = prompt_of(tok, model, 300, seed=7)
    full = Engine(model, FullMethod(), probe_every=1).generate(ids, 12)
    assert abs(full.stats["mass_recall"] - 1.0) < 1e-5 and full.stats["attn_out_rel_err"] < 1e-5
    assert len(full.probes) == 11 and set(full.probes[0]["recall"]) == set(range(model.config.num_hidden_layers))
    quest = Engine(model, QuestMethod(budget={"tokens": 32}), probe_every=2).generate(ids, 12)
    assert 0.0 < quest.stats["mass_recall"] < 0.999 and quest.stats["attn_out_rel_err"] > 1e-3
    assert len(quest.probes) == 6 and set(quest.probes[0]["recall"]) == set(range(2, model.config.num_hidden_layers))
