"""docs/fidelity.md and its plots from bench/results/fidelity_smollm2_*.json (written by bench/fidelity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Rows of the KV-size vs quality curve, and the order of the ablation table.
KV_ROWS = ("mla4", "main", "mla12", "rank64", "rank256")
NOTES = "## Notes (written by hand; kept by --render)\n"
ORDER = (
    "main",
    "baseline",
    "no_ild",
    "random_mixers",
    "zebra_init",
    "uniform",
    "reverse_kl",
    "jsd",
    "kd_lr1e3",
    "mla4",
    "mla12",
    "rope_shared",
    "rank64",
    "rank256",
    "teacher_cache",
    "mla_gdn",
    "smart_3kinds",
)


def _pct(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f} %"


def _tokens(entry: dict) -> str:
    tokens = entry.get("tokens", {})
    return f"{tokens.get('ild', 0) / 1e6:.1f}M + {tokens.get('kd', 0) / 1e6:.1f}M"


def _seconds(entry: dict) -> str:
    return ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in entry.get("stage_seconds", {}).items())


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main_table(entry: dict) -> list[str]:
    held = entry["heldout_packages"]
    teacher = held["teacher"]
    lines = [
        _row(
            "model", "held-out loss", "perplexity", "vs teacher", "KL to teacher / token", "top-1", "KV bytes / token"
        ),
        _row(*["---"] * 7),
        _row(
            "teacher",
            f"{teacher['loss']:.4f}",
            f"{teacher['perplexity']:.2f}",
            "",
            "",
            "",
            teacher["kv_bytes_per_token"],
        ),
    ]
    for name in ("initialized", "final"):
        if name not in held:
            continue
        row = held[name]
        share = 100 * row["kv_bytes_per_token"] / teacher["kv_bytes_per_token"]
        lines.append(
            _row(
                f"{name} student",
                f"{row['loss']:.4f}",
                f"{row['perplexity']:.2f}",
                _pct(row["loss"], teacher["loss"]),
                f"{row['kl_to_teacher']:.4f}",
                f"{row['top1_agreement']:.3f}",
                f"{row['kv_bytes_per_token']:,} ({share:.1f} %)",
            )
        )
    return lines


def _decode(student: dict, teacher: dict) -> str:
    """Greedy decode tokens/s at batch 16 (bench/fidelity.py decode_tokens_per_s), the teacher's beside it."""
    if "decode_tokens_per_s" not in student:
        return ""
    return f"{student['decode_tokens_per_s']:,.0f} ({teacher.get('decode_tokens_per_s', 0):,.0f})"


def ablation_table(rows: dict[str, dict]) -> list[str]:
    header = ("row", "what changes", "tokens ILD + KD", "held-out loss", "vs teacher", "KL", "top-1", "KV B/token")
    # Rows compare with the preset at their own budget: `baseline` when the ablations ran shorter than main.
    reference = "baseline" if "baseline" in rows else "main"
    lines = [_row(*header, "decode tok/s (teacher)", f"vs {reference}"), _row(*["---"] * 10)]
    main = rows.get(reference, {}).get("heldout_packages", {}).get("final")
    for name in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        entry = rows[name]
        held = entry.get("heldout_packages")
        if not held or "final" not in held:
            status = entry.get("status", "not finished") + _last_kd_ce(entry)
            lines.append(_row(name, entry["what"], _tokens(entry), status, *[""] * 6))
            continue
        final, teacher = held["final"], held["teacher"]
        lines.append(
            _row(
                name,
                entry["what"],
                _tokens(entry),
                f"{final['loss']:.4f}",
                _pct(final["loss"], teacher["loss"]),
                f"{final['kl_to_teacher']:.4f}",
                f"{final['top1_agreement']:.3f}",
                f"{final['kv_bytes_per_token']:,}",
                _decode(final, teacher),
                _pct(final["loss"], main["loss"]) if main and name not in ("main", reference) else "",
            )
        )
    return lines


def plot_curve(entry: dict, path: Path) -> Path | None:
    """Held-out CE and top-1 agreement of the student during KD against training tokens (ILD's included)."""
    curve = entry.get("curve") or {}
    if "val/kd/ce" not in curve:
        return None
    offset, per_step = curve["ild_tokens"], curve["kd_tokens_per_step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps, ce = zip(*curve["val/kd/ce"], strict=True)
    left.plot([(offset + s * per_step) / 1e6 for s in steps], ce, "o-", label="student (KD validation split)")
    teacher = (entry.get("mixture_eval") or {}).get("teacher", {}).get("loss")
    if teacher is not None:
        left.axhline(teacher, color="tab:red", linestyle="--", label="teacher")
    left.set(xlabel="training tokens (M, ILD + KD)", ylabel="held-out CE (nats / token)", title="loss")
    left.legend()
    if "val/kd/top1_agreement" in curve:
        steps, agree = zip(*curve["val/kd/top1_agreement"], strict=True)
        right.plot([(offset + s * per_step) / 1e6 for s in steps], agree, "o-")
        right.axhline(0.8, color="gray", linestyle=":")
        right.set(xlabel="training tokens (M, ILD + KD)", ylabel="top-1 agreement with the teacher", title="agreement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kv_quality(rows: dict[str, dict], path: Path) -> Path | None:
    points = []
    for name in KV_ROWS:
        held = rows.get(name, {}).get("heldout_packages", {})
        if "final" in held:
            share = 100 * held["final"]["kv_bytes_per_token"] / held["teacher"]["kv_bytes_per_token"]
            points.append((share, held["final"]["loss"], name, held["teacher"]["loss"]))
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    for share, loss, name, _ in points:
        ax.annotate(name, (share, loss), textcoords="offset points", xytext=(4, 4))
    ax.axhline(points[0][3], color="tab:red", linestyle="--", label="teacher")
    ax.set(xlabel="student KV bytes per token (% of the teacher's)", ylabel="held-out loss", title="KV size vs quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _data_line(corpus: dict, chats: dict) -> str:
    if not corpus:
        return "Data: not recorded."
    line = (
        f"Data: {corpus['train_files']:,} files ({corpus['train_bytes'] / 1e6:.1f} MB) of Python source and "
        f"documentation from {corpus['train_packages_used']} installed packages; held out: "
        f"{', '.join(corpus['heldout_packages'])} ({corpus['heldout_files']} files, "
        f"{corpus['heldout_bytes'] / 1e6:.1f} MB)."
    )
    if chats:
        line += (
            f" Teacher chats: {chats['written']:,} prompts answered by the teacher ({chats['tokens_generated']:,} "
            f"tokens, {chats['truncated']:,} cut at {chats['max_new_tokens']} tokens, {chats.get('looping', 0):,} "
            f"repeating themselves; {chats['tokens_per_s']:,.0f} tokens/s)."
        )
    return line


def _partial(entry: dict) -> list[str]:
    """What an unfinished row measured: its stages, tokens, and the KD validation split's last numbers."""
    lines = [
        f"MLA layers {entry.get('mla_layers')}; tokens ILD + KD {_tokens(entry)}; stage seconds: {_seconds(entry)}."
    ]
    curve = entry.get("curve") or {}
    last = {k: curve[k][-1] for k in ("val/kd/ce", "val/kd/divergence", "val/kd/top1_agreement") if curve.get(k)}
    if last:
        step = int(next(iter(last.values()))[0])
        lines.append(
            f"At KD step {step + 1}, on the KD validation split (held-out documents of the training mixture): "
            + ", ".join(f"{k.split('/')[-1]} {v[1]:.4f}" for k, v in last.items())
            + "."
        )
    mixture = entry.get("mixture_eval")
    if mixture and "teacher" in mixture:  # the pipeline's own eval stage finished (on the KD validation split)
        eval_s = (entry.get("stage_seconds") or {}).get("eval")
        lines += ["", f"The pipeline's eval stage ({eval_s} s) on the KD validation split:", ""]
        lines += main_table({"heldout_packages": {k.split()[0]: v for k, v in mixture.items()}})
    return [*lines, ""]


def _last_kd_ce(entry: dict) -> str:
    """The last KD-validation CE of a row not yet evaluated on the held-out packages ('' without one)."""
    points = (entry.get("curve") or {}).get("val/kd/ce")
    return f"; KD-val CE {points[-1][1]:.4f} at KD step {int(points[-1][0]) + 1}" if points else ""


def _eval_seconds(entry: dict) -> object:
    return entry["heldout_packages"].get("eval_seconds")


def _samples(entry: dict) -> list[str]:
    samples = entry.get("heldout_packages", {}).get("samples") or {}
    lines = []
    for kind, title in (("chat", "Chat answers (prompts never trained on)"), ("code", "Code completions")):
        if not samples.get(kind):
            continue
        lines += [f"### {title}", ""]
        for sample in samples[kind]:
            lines += ["**Prompt:**", "", "```", sample["prompt"].rstrip(), "```", ""]
            for model in ("teacher", "student"):
                lines += [f"*{model}:*", "", "```", sample[model].rstrip() or "(empty)", "```", ""]
    return lines


def render(result_files: list[Path], doc: Path) -> None:
    """Write `doc` (and PNGs beside the results) from every fidelity results file, newest sections first."""
    lines = [
        "# Fidelity on a real pretrained teacher",
        "",
        "What the student is worth, measured by `python -m bench.fidelity` (bench/fidelity.py): the whole recipe",
        "(`conf=smollm2_135m`: init, ILD, SMART, KD) on SmolLM2-135M-Instruct, a real pretrained Llama (30 layers,",
        "hidden 576, 9 heads / 3 KV heads, vocab 49,152). Held-out loss is on whole Python packages the run never saw;",
        "every number below is from the device named in its section. Rows of the ablation table train on equal",
        "tokens. Regenerate this page with `python -m bench.fidelity --render`.",
        "",
    ]
    for path in result_files:
        results = json.loads(path.read_text())
        rows = results.get("results", {})
        data = results.get("data", {})
        corpus, chats = data.get("corpus", {}), data.get("chats", {})
        lines += [
            f"## {results.get('card')} ({results.get('date', '')[:10]}, `{path.name}`)",
            "",
            f"Versions: {', '.join(f'{k} {v}' for k, v in (results.get('versions') or {}).items() if v)}.",
            "",
            _data_line(corpus, chats),
            "",
        ]
        main = rows.get("main")
        if main and main.get("heldout_packages"):
            lines += [
                "### The preset's student",
                "",
                f"MLA layers {main.get('mla_layers')}; tokens ILD + KD {_tokens(main)}.",
                f"Stage seconds: {_seconds(main)}; held-out evaluation: {_eval_seconds(main)} s.",
                "",
                *main_table(main),
                "",
            ]
            curve = plot_curve(main, path.with_name(path.stem + "_curve.png"))
            if curve:
                lines += [f"![held-out loss against tokens](../bench/results/{curve.name})", ""]
        elif main:
            lines += [f"The main row did not finish: {main.get('status')}", "", *_partial(main)]
            curve = plot_curve(main, path.with_name(path.stem + "_curve.png"))
            if curve:
                lines += [f"![held-out loss against tokens](../bench/results/{curve.name})", ""]
        if set(rows) - {"main"}:  # also rows recorded without main (PART=rows: the GDN rows)
            title = "### Ablations (equal training tokens; `main` trains longer where its tokens say so)"
            lines += [title, "", *ablation_table(rows), ""]
            kv = plot_kv_quality(rows, path.with_name(path.stem + "_kv_quality.png"))
            if kv:
                lines += [f"![KV size against held-out loss](../bench/results/{kv.name})", ""]
        if main:
            lines += _samples(main)
    # Hand-written reading of the numbers lives under NOTES and survives a re-render.
    notes = doc.read_text().partition(NOTES)[2] if doc.exists() else ""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n\n" + NOTES + (notes or "\n"))
