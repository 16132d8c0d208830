"""Shared pytest fixtures: the two offline models, each loaded once per session (fp32, CPU).

The environment is forced offline before anything imports huggingface_hub or transformers, so no
test can reach the network, and wandb never starts.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path

import pytest


def conf_dir() -> Path:
    """The Hydra config folder (``<repo>/conf``)."""
    return Path(__file__).resolve().parent.parent / "conf"


def model_conf(name: str):
    """The OmegaConf config of ``conf/model/<name>.yaml``."""
    from omegaconf import OmegaConf

    return OmegaConf.load(conf_dir() / "model" / f"{name}.yaml")


@pytest.fixture(scope="session")
def tiny_random():
    """``(model, ByteTokenizer)`` of ``conf/model/tiny_random.yaml``: fp32, CPU, eval mode."""
    from retrobench.inputs.models import load_model

    return load_model(model_conf("tiny_random"), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from ``conf/model/smollm2_135m.yaml`` (~20 s)."""
    from retrobench.inputs.models import load_model

    return load_model(model_conf("smollm2_135m"), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """The SmolLM2 tokenizer (from the shared model load: a GGUF tokenizer alone takes ~7 s)."""
    return smollm2[1]


def run_cli(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    """``python -m retrobench run <overrides>`` into ``tmp_path/res``; returns (metrics.json record, results dir)."""
    import json
    import subprocess
    import sys

    results = tmp_path / "res"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "retrobench", "run", *overrides, f"results_dir={results}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (metrics_file,) = (results / "runs").glob("*/metrics.json")
    return json.loads(metrics_file.read_text()), results


def kill_when(proc, ready, timeout: float, what: str = "the process") -> None:
    """SIGKILL ``proc`` (its process group when it leads one) as soon as ``ready()`` holds.

    Fails when ``proc`` ends first or ``ready()`` does not hold within ``timeout`` seconds; always
    reaps ``proc``. The kill-and-resume tests use it to stop a run at a chosen point.
    """
    import signal
    import time

    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{what} ended before it could be killed"
            assert time.time() < deadline, f"{what} did not reach the kill point in {timeout:.0f} s"
            time.sleep(0.01)
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
