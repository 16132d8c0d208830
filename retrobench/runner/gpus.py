"""One whole GPU per job when several jobs run at once on one host (Hydra's joblib launcher).

Hydra's joblib launcher runs jobs in loky worker processes and gives them no per-job
environment, so ``CUDA_VISIBLE_DEVICES`` cannot be set per job from outside. Instead each job
claims a free GPU itself, before its model loads: :func:`assigned` takes an exclusive,
non-blocking ``flock`` on ``<lock dir>/gpu<i>.lock`` for the first free index ``i`` of the
visible GPUs (the one this worker used last is tried first, so its cached model stays valid),
sets the run's ``device`` to ``cuda:<i>`` and holds the lock until the job ends. When every GPU
is taken the job waits, so two concurrently running jobs never share a GPU. The kernel drops a
lock when its process dies, so a killed job never leaves a GPU marked busy.

When it applies (run-level key ``gpu_pool``, not part of the run hash):

- ``auto`` (default): ``device: cuda`` (no index) and more than one GPU visible;
- ``true``: any ``device: cuda`` (with one GPU, concurrent jobs queue for it);
- ``false``: never (``cuda`` is the current device, as in plain PyTorch).

``device: cuda:N`` and ``device: auto`` (an accelerate device map over all GPUs) never pool;
under SLURM (the submitit launcher) each job already sees only its own allocation.

The lock folder is ``$RETROBENCH_GPU_LOCK_DIR`` or ``<tmp>/retrobench-gpus-<uid>``: one per user
and host, shared by every retrobench process of that user there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

POOL_VALUES = ("auto", True, False)
ALLOWED = "auto, true, false"  # POOL_VALUES as a user writes them
#: The GPU index this process used last (tried first by the next job of the same worker).
_last: int | None = None


def lock_dir() -> Path:
    """Where the per-GPU lock files live (created on demand)."""
    folder = os.environ.get("RETROBENCH_GPU_LOCK_DIR") or str(
        Path(tempfile.gettempdir()) / f"retrobench-gpus-{os.getuid()}"
    )
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_pool(device: str, pool: Any, count: int) -> bool:
    """Whether a job on ``device`` claims a GPU from the pool (see the module docstring)."""
    if pool not in POOL_VALUES:
        raise ValueError(f"gpu_pool={pool} is not allowed; allowed: {ALLOWED}")
    if str(device) != "cuda" or pool is False or count < 1:
        return False
    return pool is True or count > 1


def _try_lock(path: Path) -> Any | None:
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole job
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _holders(folder: Path, count: int) -> str:
    pids = []
    for i in range(count):
        try:
            pids.append(f"{i}:{(folder / f'gpu{i}.lock').read_text().strip() or '?'}")
        except OSError:
            pids.append(f"{i}:?")
    return ", ".join(pids)


@contextlib.contextmanager
def claim(
    count: int, folder: Path | None = None, prefer: int | None = None, poll_s: float = 1.0
) -> Iterator[int]:
    """Hold one free GPU index in ``range(count)`` exclusively for the ``with`` block.

    Tries ``prefer`` first, then every index in order; when all are held by other processes it
    waits (polling every ``poll_s`` seconds) and says so once on stderr.
    """
    folder = folder or lock_dir()
    order = ([prefer] if prefer is not None and 0 <= prefer < count else []) + [
        i for i in range(count) if i != prefer
    ]
    told = False
    while True:
        for index in order:
            handle = _try_lock(folder / f"gpu{index}.lock")
            if handle is not None:
                try:
                    yield index
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                    handle.close()
                return
        if not told:
            print(
                f"waiting for a free GPU: all {count} are held (gpu:pid {_holders(folder, count)})",
                file=sys.stderr,
                flush=True,
            )
            told = True
        time.sleep(poll_s)


@contextlib.contextmanager
def assigned(cfg: Any) -> Iterator[int | None]:
    """For the ``with`` block, give the job of run config ``cfg`` its own GPU when the pool applies.

    Sets ``cfg.device`` to ``cuda:<i>`` (and makes it torch's current device) and yields ``i``;
    yields None and changes nothing when the pool does not apply.
    """
    global _last
    pool = cfg.get("gpu_pool", "auto")
    device = str(cfg.get("device", "cpu"))
    if device != "cuda" or pool is False:  # cheap exit: no torch.cuda query
        yield None
        return
    count = visible_gpus()
    if not wants_pool(device, pool, count):
        yield None
        return
    import torch

    with claim(count, prefer=_last) as index:
        _last = index
        cfg.device = f"cuda:{index}"
        torch.cuda.set_device(index)
        try:
            yield index
        finally:
            cfg.device = device


def oversubscribed(count: int | None = None) -> bool:
    """Whether the parallel launcher runs more jobs at once than there are GPUs (joblib ``n_jobs``).

    Then a worker that waits for a GPU, or sits idle, must not keep a model on a GPU that another
    worker may claim next (:func:`retrobench.runner.run.main` frees its cached model after such a job).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        n_jobs = HydraConfig.get().launcher.get("n_jobs")
    except (ImportError, ValueError):
        return False
    if n_jobs is None:
        return False
    count = visible_gpus() if count is None else count
    return int(n_jobs) < 0 or int(n_jobs) > count


def _register_resolver() -> None:
    """``${retrobench_gpus:}`` in configs: visible GPUs, at least 1 (``hydra/launcher/local_gpus.yaml``)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("retrobench_gpus"):
        OmegaConf.register_new_resolver("retrobench_gpus", lambda: max(1, visible_gpus()))


_register_resolver()  # imported by retrobench.runner.run, i.e. before Hydra resolves the launcher config

__all__ = ["assigned", "claim", "lock_dir", "oversubscribed", "visible_gpus", "wants_pool"]
