"""PNG plots for the run folder: training/validation loss curves per stage, per-layer ILD losses."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .csv_log import read_metrics  # noqa: E402


def plot_losses(run_dir: Path, target: Path) -> Path | None:
    """train/loss and val/loss of each training stage (from the CSV logs)."""
    from train.stages import TRAINING_STAGES

    stages = [s for s in TRAINING_STAGES if (run_dir / s / "logs" / "metrics.csv").exists()]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        series = read_metrics(run_dir / stage / "logs" / "metrics.csv")
        for key in ("train/loss", "val/loss"):
            if key in series:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, label=key, marker="o" if key.startswith("val") else None)
        ax.set(title=stage.upper(), xlabel="step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def plot_ild_layers(layer_losses: dict[str, dict[str, float]], target: Path) -> Path:
    """Held-out ILD loss per layer, one bar per candidate kind."""
    layers = sorted(layer_losses, key=int)
    kinds = sorted({k for row in layer_losses.values() for k in row})
    fig, ax = plt.subplots(figsize=(max(4, len(layers)), 3.5))
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        xs = [int(layer) + j * width for layer in layers]
        ax.bar(xs, [layer_losses[layer].get(kind, 0.0) for layer in layers], width=width, label=kind)
    ax.set(xlabel="layer", ylabel="held-out ILD loss", yscale="log", title="per-layer alignment loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def plot_selection(scores: list[float], chosen: list[int], target: Path) -> Path:
    """SMART sensitivity per layer, the layers chosen as MLA highlighted."""
    fig, ax = plt.subplots(figsize=(max(4, len(scores) * 0.5), 3.5))
    colors = ["tab:red" if i in chosen else "tab:gray" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set(
        xlabel="layer", ylabel="log(L_best fill kind / L_mla)", title=f"SMART sensitivity; MLA layers {chosen} in red"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
