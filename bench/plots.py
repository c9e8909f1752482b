"""PNG plots of a bench/generate.py result: decode throughput, peak memory and maximum batch against context."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"student": "tab:blue", "teacher": "tab:red"}


def _series(decode: list[dict], model: str, batch: int | str, key: str) -> tuple[list[int], list[float]]:
    """(contexts, values) of one model at a fixed batch, or at each context's maximum batch ("max")."""
    rows = [
        r
        for r in decode
        if r["model"] == model and (r.get("at_max_batch") if batch == "max" else r["batch"] == batch) and r[key]
    ]
    rows.sort(key=lambda r: r["context"])
    return [r["context"] for r in rows], [r[key] for r in rows]


def _line_plot(results: dict, key: str, ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = sorted({r["batch"] for r in results["decode"] if not r.get("at_max_batch")})
    styles = ["-", "--", "-.", ":", (0, (3, 1, 1, 1))]
    for model, color in COLORS.items():
        for i, batch in enumerate(batches):
            x, y = _series(results["decode"], model, batch, key)
            if x:
                ax.plot(
                    x, y, linestyle=styles[i % len(styles)], marker="o", ms=3, color=color, label=f"{model} b={batch}"
                )
        x, y = _series(results["decode"], model, "max", key)
        if x:
            ax.plot(x, y, linestyle="-", lw=2.5, marker="s", color=color, alpha=0.5, label=f"{model} max batch")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} - {results['preset']}, {results['card']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _max_batch_plot(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, color in COLORS.items():
        found = {int(c): v for c, v in results["max_batch"].get(model, {}).items() if v}
        contexts = sorted(found)
        if contexts:
            ax.plot(contexts, [found[c]["batch"] for c in contexts], marker="o", color=color, label=model)
            capped = [c for c in contexts if found[c]["capped"]]
            ax.scatter(capped, [found[c]["batch"] for c in capped], marker="^", s=60, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("maximum decode batch (triangles: search cap)")
    ax.set_title(f"Maximum batch - {results['preset']}, {results['card']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_generate(results: dict, stem: Path) -> list[Path]:
    """Write <stem>_throughput.png, <stem>_memory.png (GPU runs) and <stem>_max_batch.png; return their paths."""
    stem = Path(stem)
    paths = [
        _line_plot(
            results,
            "tokens_per_s",
            "decode tokens/s",
            "Decode throughput",
            stem.with_name(stem.name + "_throughput.png"),
        )
    ]
    if any(r["peak_gib"] for r in results["decode"]):
        memory = stem.with_name(stem.name + "_memory.png")
        paths.append(_line_plot(results, "peak_gib", "peak GPU memory (GiB)", "Decode peak memory", memory))
    paths.append(_max_batch_plot(results, stem.with_name(stem.name + "_max_batch.png")))
    return paths


def long_context_series(results: dict) -> dict[tuple[str, str], list[tuple[int, float, float | None]]]:
    """From a bench/train.py results file: per (stage, masking), (seq_len, tokens/s per GPU, peak GiB per 1K tokens
    of a micro-batch) rows in sequence order, for the runs bench/run_long_context.sh records (keys with their
    masking; "+ckpt" after the masking where activation checkpointing was on)."""
    series: dict[tuple[str, str], list[tuple[int, float, float | None]]] = {}
    for key, row in results.get("results", {}).items():
        masking = row.get("document_masking")
        if masking is None or "tokens_per_s_per_gpu" not in row:
            continue
        gib, tokens = row.get("peak_memory_gib"), row["seq_len"] * row.get("micro_batch", 1)
        entry = (row["seq_len"], row["tokens_per_s_per_gpu"], None if gib is None else 1024 * gib / tokens)
        masking += "+ckpt" if row.get("gradient_checkpointing") else ""
        series.setdefault((key.split("/")[0], masking), []).append(entry)
    return {name: sorted(rows) for name, rows in sorted(series.items())}


def plot_long_context(results: dict, stem: Path) -> list[Path]:
    """<stem>_throughput.png (training tokens/s per GPU against sequence length) and <stem>_memory.png (peak GiB per
    1K tokens of a micro-batch: flat when memory grows only with the activations), one line per stage and masking."""
    stem, series, paths = Path(stem), long_context_series(results), []
    panels = [
        ("throughput", "training tokens/s per GPU", lambda s, tps, gib: tps),
        ("memory", "peak GiB per 1K tokens of a micro-batch", lambda s, tps, gib: gib),
    ]
    for name, ylabel, value in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (stage, masking), rows in series.items():
            points = [(s, value(s, tps, gib)) for s, tps, gib in rows if value(s, tps, gib) is not None]
            if points:
                style = "-" if masking.startswith(("flex", "auto")) else "--"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{stage}, {masking} masks")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"zebra_1b {name} against length ({results.get('card', 'CPU')})")
        ax.grid(alpha=0.3)
        ax.legend()
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
