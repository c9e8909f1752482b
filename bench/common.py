"""What every benchmark shares: synchronized timing, the medians it reports, and the results file it writes
(card, date and versions with every number)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def environment() -> dict:
    versions = {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version()}
    for name in ("transformers", "deepspeed", "triton", "mamba-ssm"):
        try:  # from the installed metadata: importing mamba_ssm runs its __init__, which needs its CUDA extension
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"card": card, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions}


def record(path: Path, key: str, value: Any, header: dict) -> None:
    """Merge one measurement into the results file (atomically), keeping the others."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({k: v for k, v in header.items() if k not in results or k in ("date", "versions")})
    results.setdefault("results", {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
