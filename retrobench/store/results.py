"""The result store: one folder per run, named by a hash of its semantic config.

Layout (DESIGN.md "Results")::

    <results_dir>/runs/<hash12>/
        config.yaml     resolved config of the run
        env.json        provenance: git sha + dirty flag, library versions, device, backend
        samples.jsonl   one JSON line per finished sample, appended and fsync'ed as it finishes
        metrics.json    written last; its presence marks the run finished

The hash covers everything that changes the numbers (model, method, task, engine, seed) and
nothing that does not (device, logger, paths, ``overwrite``, Hydra's own settings), so the same
experiment on another machine or with wandb on lands in the same folder and is skipped once
done. A run killed at any point resumes from ``samples.jsonl``: a half-written last line is
dropped (the file is rewritten without it), so no sample is lost or duplicated.

Reading the store back into pandas frames is :mod:`retrobench.store.tables` (``load_runs``,
``load_samples``); it never runs a model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

#: Top-level config keys that never change results and so are left out of the run hash.
EXCLUDED_KEYS = ("device", "logger", "results_dir", "overwrite", "hydra", "gpu_pool")
#: Engine keys left out too: how many sequences share a batch and whether the layers run compiled
#: change speed, not outputs (tests prove greedy outputs equal at any batch size and the compiled
#: layers equal to transformers' modules within dtype tolerance; sampling is seeded per sample).
EXCLUDED_ENGINE_KEYS = ("batch_size", "compile")

CONFIG_FILE, ENV_FILE, SAMPLES_FILE, METRICS_FILE = "config.yaml", "env.json", "samples.jsonl", "metrics.json"


# ---- identity -----------------------------------------------------------------------------------


def semantic_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data, without :data:`EXCLUDED_KEYS`."""
    from omegaconf import DictConfig, OmegaConf

    from retrobench.kernels.ops import resolve_backend, resolve_prefill_chunk

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out = {k: v for k, v in data.items() if k not in EXCLUDED_KEYS}  # type: ignore[union-attr]
    if isinstance(out.get("engine"), Mapping):  # backend / prefill_chunk = auto hash as what they pick
        engine = {k: v for k, v in out["engine"].items() if k not in EXCLUDED_ENGINE_KEYS}
        device = str(data.get("device", "cpu"))
        if "backend" in engine:
            engine["backend"] = resolve_backend(str(engine["backend"]), device)
        if "prefill_chunk" in engine:
            engine["prefill_chunk"] = resolve_prefill_chunk(engine["prefill_chunk"], device)
        out["engine"] = engine
    return out


def run_hash(cfg: Any) -> str:
    """12 hex characters of the sha256 of the canonical JSON of :func:`semantic_config`."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_dir(cfg: Any) -> Path:
    """``<results_dir>/runs/<run_hash(cfg)>/`` (not created)."""
    return Path(str(cfg["results_dir"])) / "runs" / run_hash(cfg)


def finished(path: Path) -> bool:
    """A run is finished once its ``metrics.json`` exists."""
    return (Path(path) / METRICS_FILE).is_file()


# ---- provenance -----------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: str, device: str) -> dict[str, Any]:
    """Provenance of this process: code version, library versions, hardware, backend."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    declared = os.environ.get("RETROBENCH_GIT_SHA")  # a copied tree whose .git is not its commit's
    env: dict[str, Any] = {
        "git_sha": declared or sha,
        "git_dirty": None if status is None or declared else bool(status),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "hydra": _version("hydra-core"),
        "retrobench": _version("retrobench"),
        "backend": backend,
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cuda_visible_devices": None,
        "hostname": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if declared:
        env["git_sha_declared"] = True  # by RETROBENCH_GIT_SHA; the checkout's own HEAD below
        env["git_head"] = sha
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
            env["cuda"] = torch.version.cuda
            env.update(gpu_info(str(device)))  # gpu_index, gpu_name, gpu_uuid, gpu_memory_gb
        env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    env.update(_job_info())
    return env


def gpu_info(device: str) -> dict[str, Any]:
    """Index, name, UUID and memory of the CUDA device ``device`` (``cuda`` = the current one)."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return {
        "gpu_index": index,
        "gpu_name": props.name,
        "gpu_uuid": f"GPU-{uuid}" if uuid is not None and not str(uuid).startswith("GPU-") else uuid,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
    }


def _job_info() -> dict[str, Any]:
    """The Hydra launcher and job number that ran this run, and the process id (scaling out)."""
    info: dict[str, Any] = {"pid": os.getpid()}
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app
        return info
    info["launcher"] = hydra.runtime.choices.get("hydra/launcher")
    info["job_num"] = hydra.job.get("num")
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(var):
            info[var.lower()] = os.environ[var]
    return info


def write_env(path: Path, backend: str, device: str) -> dict[str, Any]:
    """Write ``env.json`` in run folder ``path``; on a resume keep the first start and list resumes."""
    file = Path(path) / ENV_FILE
    env = environment(backend, device)
    if file.is_file():
        try:
            first = json.loads(file.read_text())
        except (OSError, ValueError):
            first = None
        if isinstance(first, dict):
            keep = ("git_sha", "git_dirty", "hostname", "device", "device_name", "gpu_uuid", "backend",
                    "launcher", "timestamp")  # fmt: skip
            first.setdefault("resumes", []).append({k: env.get(k) for k in keep})
            env = first
    _atomic_write(file, json.dumps(env, indent=2, default=str) + "\n")
    return env


# ---- samples --------------------------------------------------------------------------------------


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The complete rows of ``samples.jsonl`` (``path`` is the file), repairing it if needed
    (see :func:`repair_samples`)."""
    return repair_samples(path)[0]


def repair_samples(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``(rows, dropped)``: the complete rows of ``samples.jsonl`` and how many lines were dropped.

    A run killed mid-write can leave a last line without its newline or with broken JSON; such a
    line is dropped and the file rewritten (atomically) with the other lines byte for byte, so the
    next append starts on a clean line. Duplicate ids (never written by :func:`append_sample` users
    that check ids) keep their first row.
    """
    path = Path(path)
    if not path.is_file():
        return [], 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: b"" when the file ends cleanly
    rows, kept, seen, dropped = [], [], set(), int(bool(tail.strip()))
    for line in lines:
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or row.get("id") in seen:
            dropped += 1
            continue
        seen.add(row.get("id"))
        rows.append(row)
        kept.append(line + b"\n")
    if dropped or len(kept) != len(lines):
        _atomic_write(path, b"".join(kept))
    return rows, dropped


def append_sample(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row as a JSON line, flushed and fsync'ed before returning."""
    data = (json.dumps(row, default=_json_default) + "\n").encode()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees a half-written ``metrics.json``)."""
    _atomic_write(Path(path), json.dumps(data, indent=2, default=_json_default) + "\n")


# ---- tables -----------------------------------------------------------------------------------------


def run_folders(results_dir: str | Path) -> list[Path]:
    """The finished run folders under ``<results_dir>/runs/`` (or ``results_dir`` itself), sorted."""
    root = Path(results_dir)
    runs = root / "runs" if (root / "runs").is_dir() else root
    return sorted(p.parent for p in runs.glob(f"*/{METRICS_FILE}"))


__all__ = [
    "EXCLUDED_KEYS",
    "append_sample",
    "environment",
    "finished",
    "gpu_info",
    "read_samples",
    "run_dir",
    "run_folders",
    "run_hash",
    "semantic_config",
    "write_env",
    "write_json",
]
