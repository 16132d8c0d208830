"""Full-attention references, computed once per sample and cached in the result store.

Perplexity ratios and fidelity compare every method with full attention on the same sample. The
full-attention side does not depend on the method, so it is computed once and stored under
``<results_dir>/reference/<kind>-<hash>.pt``; every later run (any method, any seed, resumed or
not) reads it instead of recomputing it. The hash covers everything that changes the reference:
the model config, the engine settings that change numerics (page size, prefill chunk, backend,
dtype, device type), the task settings that shape the sample, the sample id, and a digest of the
token ids themselves, so a changed prompt can never hit a stale entry.

Files are written atomically (temporary name, then rename), so parallel runs that compute the
same reference race harmlessly, and a half-written file is never read. An unreadable file is
treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

FOLDER = "reference"


def token_digest(*sequences: Sequence[int]) -> str:
    """sha256 of the token ids (sequences separated), hex."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(json.dumps([int(t) for t in seq], separators=(",", ":")).encode())
        h.update(b"|")
    return h.hexdigest()


def engine_identity(engine: Any) -> dict[str, Any]:
    """The engine settings a reference depends on."""
    return {
        "page_size": int(engine.page_size),
        "prefill_chunk": int(engine.prefill_chunk),
        "backend": str(engine.backend),
        "dtype": str(engine.dtype),
        "device": str(engine.device.type),
    }


class ReferenceStore:
    """``<results_dir>/reference/``: a content-addressed cache of full-attention references.

    ``hits`` / ``misses`` count lookups in this process (tests and logs use them).
    """

    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir) / FOLDER
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, identity: dict[str, Any]) -> str:
        """``<kind>-<24 hex of sha256(canonical JSON of identity)>``."""
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None if it is missing or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - truncated or foreign file: recompute
            return None
        return data if isinstance(data, dict) else None

    def save(self, key: str, data: dict[str, Any]) -> Path:
        """Write an entry atomically; returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save(data, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], dict[str, Any]],
        valid: Callable[[dict[str, Any]], bool] = lambda data: True,
    ) -> tuple[dict[str, Any], bool]:
        """``(entry, cached)``: the stored entry if present and ``valid``, else ``compute()`` saved."""
        data = self.load(key)
        if data is not None and valid(data):
            self.hits += 1
            return data, True
        self.misses += 1
        data = compute()
        self.save(key, data)
        return data, False


__all__ = ["FOLDER", "ReferenceStore", "engine_identity", "token_digest"]
