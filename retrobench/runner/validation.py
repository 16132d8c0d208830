"""Pre-flight checks of a composed run config: everything is validated before any work starts.

DESIGN.md "Bad input": every configuration error stops before a model loads, with one line that
names the key and the allowed values, and nothing written to the result store. The method and
task validate themselves when instantiated (their ``__post_init__``); this module adds the engine
and device settings, the context length against the model's limit, the model's files (through
:func:`retrobench.inputs.models.check_model_available`) and the logger. :func:`validate` runs them all
in that order and returns the instantiated method and task.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any, NoReturn

from omegaconf import DictConfig

from retrobench.runner import gpus

from retrobench.conf import ConfigError
from retrobench.kernels.ops import BACKENDS, resolve_backend
DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("offline", "online", "disabled")



def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit (no traceback)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def _choice(group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except ValueError:  # outside a Hydra app (tests calling validate directly)
        return "?"


def _instantiate(node: DictConfig, group: str) -> Any:
    """``hydra.utils.instantiate`` with the cause of a failure turned into one config-error line."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            match = re.search(r"argument '(\w+)'", str(cause))
            target = get_class(node._target_)
            allowed = (
                [f.name for f in dataclasses.fields(target) if f.init]
                if dataclasses.is_dataclass(target)
                else []
            )
            key = match.group(1) if match else "?"
            raise ConfigError(
                f"{group}.{key} is not a setting of {group}={_choice(group)}; allowed: {', '.join(allowed)}"
            ) from None
        if isinstance(cause, ValueError):  # a ConfigError carries the key; add the group's choice
            choice = _choice(group)
            where = f"{group}={choice}"
            text = str(cause) if choice == "?" or where in str(cause) else f"{cause} ({where})"
            raise ConfigError(text) from None
        raise ConfigError(f"{group}: {str(exc).splitlines()[0]}") from None


def check_engine(engine: DictConfig, device: str) -> None:
    """Engine and device settings: page size, prefill chunk, backend (and its hardware), dtype."""
    from retrobench.engine.engine import check_settings

    check_settings(engine.get("page_size"), engine.get("prefill_chunk"), engine.get("compile", "auto"))
    dtype = engine.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(
            f"engine.dtype={dtype} is not supported; allowed: null (the model's), {', '.join(DTYPES)}"
        )
    if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", str(device)):
        raise ConfigError(f"device={device} is not supported; allowed: cpu, cuda, cuda:N, auto")
    import torch

    cuda = torch.cuda.is_available()
    if str(device) != "cpu" and not cuda:
        raise ConfigError(
            f"device={device} needs a CUDA GPU and none is visible; allowed here: device=cpu"
        )
    backend = engine.get("backend")
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"engine.backend={backend} is not a backend; allowed: auto, {', '.join(BACKENDS)}")
    backend = resolve_backend(backend, device)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError(
                "engine.backend=triton needs the triton package; allowed here: engine.backend=torch"
            )
        on_gpu = cuda and str(device).startswith("cuda")
        if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "engine.backend=triton needs a CUDA GPU (device=cuda) or TRITON_INTERPRET=1 on CPU; "
                "allowed here: engine.backend=torch"
            )
    batch = engine.get("batch_size", 1)
    if batch != "auto" and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ConfigError(f"engine.batch_size must be an integer >= 1 or auto, got {batch}")
    temperature, top_p = engine.get("temperature", 0.0), engine.get("top_p", 1.0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"engine.temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"engine.top_p must be in (0, 1], got {top_p}")


def check_context(cfg: DictConfig, task: Any) -> None:
    """Prompt plus generation must fit the model's context (for tasks that set a context length)."""
    context = getattr(task, "context_tokens", None)
    limit = cfg.model.get("max_context")
    if context is None or limit is None:
        return
    total = int(context) + int(task.max_new_tokens)
    if total > int(limit):
        raise ConfigError(
            f"task.context_tokens + task.max_new_tokens = {context} + {task.max_new_tokens} = {total} exceeds "
            f"model.max_context = {limit} (model={cfg.model.get('name')}); lower task.context_tokens or "
            "task.max_new_tokens"
        )


def check_logger(logger: DictConfig) -> None:
    name = logger.get("name", "none")
    if name == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logger=wandb needs the wandb package (`pip install wandb`); allowed: logger=none"
            )
        if logger.get("mode") not in WANDB_MODES:
            raise ConfigError(
                f"logger.mode={logger.get('mode')} is not a wandb mode; allowed: {', '.join(WANDB_MODES)}"
            )


def validate(cfg: DictConfig) -> tuple[Any, Any]:
    """Check every setting before any work; returns ``(method, task)`` or raises a config error."""
    from retrobench.inputs.models import check_model_available

    method = _instantiate(cfg.method, "method")
    task = _instantiate(cfg.task, "task")
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')}")
    check_engine(cfg.engine, str(cfg.device))
    if cfg.get("gpu_pool", "auto") not in gpus.POOL_VALUES:
        raise ConfigError(f"gpu_pool={cfg.get('gpu_pool')} is not allowed; allowed: {gpus.ALLOWED}")
    check_context(cfg, task)
    dtype = cfg.model.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(
            f"model.dtype={dtype} is not supported (model={cfg.model.get('name')}); allowed: {', '.join(DTYPES)}"
        )
    try:
        check_model_available(cfg.model)
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None
    check_logger(cfg.logger)
    return method, task


__all__ = ["ConfigError", "check_context", "check_engine", "check_logger", "fail", "validate"]
