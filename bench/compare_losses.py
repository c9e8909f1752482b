"""Compare the per-step training losses of two pipeline runs (e.g. 2 GPUs x micro-batch m against 1 GPU x 2m, the
same global batches): `python -m bench.compare_losses RUN_A RUN_B --stages ild,kd --rtol 0.02`. Exit 1 on a
mismatch, with the worst step named."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.runtime.csv_log import read_metrics


def step_losses(stage_dir: Path) -> dict[int, float]:
    """{step: train/loss} from a stage's metrics.csv (the last value of a step wins, e.g. after a resume)."""
    return {int(step): loss for step, loss in read_metrics(stage_dir / "logs" / "metrics.csv").get("train/loss", [])}


def compare(a: Path, b: Path, stage: str, rtol: float) -> tuple[bool, str]:
    la, lb = step_losses(a / stage), step_losses(b / stage)
    steps = sorted(la.keys() & lb.keys())
    if not steps:
        return False, f"{stage}: no common steps ({len(la)} vs {len(lb)} logged)"
    worst = max(steps, key=lambda s: abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12))
    err = abs(la[worst] - lb[worst]) / max(abs(lb[worst]), 1e-12)
    pairs = ", ".join(f"{la[s]:.4f}/{lb[s]:.4f}" for s in steps)
    return err <= rtol, f"{stage}: {len(steps)} steps, worst rel diff {err:.2e} at step {worst} ({pairs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--stages", default="ild,kd")
    parser.add_argument("--rtol", type=float, default=0.02)
    args = parser.parse_args()
    ok = True
    for stage in args.stages.split(","):
        good, line = compare(args.run_a, args.run_b, stage, args.rtol)
        print(("   agree " if good else "   DIFFER ") + line)
        ok &= good
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
