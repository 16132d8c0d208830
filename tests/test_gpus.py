"""The per-job GPU pool (``retrobench/runner/gpus.py``): when it applies, and that two processes never hold
the same GPU at once (file locks, exercised on CPU with fake GPU counts); a real 2-job joblib run
on CUDA is the ``gpu`` test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retrobench.runner import gpus


@pytest.mark.parametrize(
    ("device", "pool", "count", "expected"),
    [
        ("cuda", "auto", 2, True),
        ("cuda", "auto", 1, False),  # one GPU: plain sequential behaviour
        ("cuda", True, 1, True),
        ("cuda", False, 4, False),
        ("cuda:1", True, 4, False),  # an explicit index is the user's choice
        ("auto", True, 4, False),  # accelerate device map over every GPU
        ("cpu", True, 4, False),
        ("cuda", "auto", 0, False),
    ],
)
def test_wants_pool(device: str, pool, count: int, expected: bool) -> None:
    assert gpus.wants_pool(device, pool, count) is expected


def test_wants_pool_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="gpu_pool"):
        gpus.wants_pool("cuda", "sometimes", 2)


def test_claim_prefers_and_releases(tmp_path: Path) -> None:
    with gpus.claim(3, tmp_path, prefer=2) as first:
        assert first == 2
        with gpus.claim(3, tmp_path, prefer=2) as second:  # 2 is held (another open file description)
            assert second == 0
    with gpus.claim(3, tmp_path) as again:  # released on exit
        assert again == 0


HOLD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from retrobench.runner import gpus
    folder, count, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with gpus.claim(count, folder, poll_s=0.05) as index:
        start = time.time()
        time.sleep(1.0)
        Path(out).write_text(json.dumps({"gpu": index, "start": start, "end": time.time()}))
    """
)


def _hold_many(tmp_path: Path, count: int, jobs: int) -> list[dict]:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD, str(tmp_path), str(count), str(tmp_path / f"{j}.json")], env=env
        )
        for j in range(jobs)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    return [json.loads((tmp_path / f"{j}.json").read_text()) for j in range(jobs)]


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_concurrent_jobs_never_share_a_gpu(tmp_path: Path) -> None:
    """3 processes, 2 GPUs: at every moment the GPUs held are distinct (the third waits)."""
    held = _hold_many(tmp_path, count=2, jobs=3)
    assert {h["gpu"] for h in held} <= {0, 1}
    for i, a in enumerate(held):
        for b in held[i + 1 :]:
            if a["gpu"] == b["gpu"]:
                assert not _overlap(a, b), held


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom retrobench.runner import gpus\n"
        "with gpus.claim(1, Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait(timeout=30)
    t0 = time.time()
    with gpus.claim(1, tmp_path) as index:
        assert index == 0 and time.time() - t0 < 5


@pytest.mark.gpu
def test_joblib_jobs_get_distinct_gpus_on_cuda(tmp_path: Path) -> None:
    """Two jobs through the joblib launcher on CUDA with the pool on: each runs on the GPU it claimed
    and records it (index, name, UUID); with two GPUs or more the two jobs hold different ones."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = tmp_path / "res"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONSAFEPATH": "1",
           "RETROBENCH_GPU_LOCK_DIR": str(tmp_path / "locks")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "retrobench", "run", "-m", "experiment=smoke", "device=cuda", "gpu_pool=true",
         "hydra/launcher=local_gpus", "hydra.launcher.n_jobs=2", "seed=0,1", f"results_dir={results}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    envs = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/env.json"))]
    assert len(envs) == 2
    for env_json in envs:
        assert env_json["device"].startswith("cuda:") and env_json["gpu_uuid"] and env_json["gpu_name"]
        assert env_json["device"] == f"cuda:{env_json['gpu_index']}"
    if torch.cuda.device_count() >= 2:
        assert len({e["gpu_uuid"] for e in envs}) == 2
