"""SMART layer selection (Zebra-Llama): which layers stay attention-like (MLA) and which become Mamba2.

Sensitivity of layer i: how much worse the best aligned candidate of another kind (Mamba2) reproduces the teacher
than the aligned candidate of the placed kind (MLA, models/mixers.py PLACED_KIND), log(L_other / L_placed) of the
held-out ILD losses (scale-free across depths). The rule:
terminal layers are kept as MLA (optional), the MLA layers are spread near-uniformly (every gap between
consecutive MLA layers within +-50 % of the ideal (L-1)/(K-1)), and among the maps that satisfy both, the
one with the largest total sensitivity wins (exact dynamic programming). The number of MLA layers comes
from the user or from a KV-cache budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .mixers import MIXERS, PLACED_KIND


@dataclass
class Selection:
    layers: list[int]
    scores: list[float]
    trace: list[str] = field(default_factory=list)


def sensitivity_from_ild(layer_losses: dict[str, dict[str, float]], num_layers: int) -> list[float]:
    """{layer: {kind name: loss}} -> per-layer log(L_best other kind / L_placed kind), over the kinds measured."""
    placed = PLACED_KIND.name
    scores = []
    for i in range(num_layers):
        row = layer_losses.get(str(i), layer_losses.get(i)) or {}
        others = [loss for kind, loss in row.items() if kind != placed and kind in MIXERS]
        if placed not in row or not others:
            raise ValueError(
                f"select: layer {i} has ILD losses of {sorted(row)}, needs {placed!r} and another of "
                f"{list(MIXERS)}; run ild with candidates=both"
            )
        scores.append(math.log(max(min(others), 1e-30) / max(row[placed], 1e-30)))
    return scores


def num_mla_for_budget(budget: float, teacher_bytes_per_token: int, mla_bytes_per_layer: int, num_layers: int) -> int:
    """Most MLA layers whose KV cache stays within `budget` (a fraction of the teacher's bytes per token)."""
    if not 0 < budget <= 1:
        raise ValueError(f"student.kv_budget={budget} is invalid: a fraction of the teacher's KV cache in (0, 1]")
    count = int(budget * teacher_bytes_per_token // mla_bytes_per_layer)
    return min(count, num_layers)


SELECT_RULES = ("smart", "uniform")  # select.rule: sensitivity-driven, or the evenly spaced baseline


def uniform_select(num_layers: int, num_mla: int) -> Selection:
    """The baseline SMART is measured against: `num_mla` layers evenly spaced over the stack, ends included."""
    if not 0 <= num_mla <= num_layers:
        raise ValueError(f"select: cannot place {num_mla} MLA layers in {num_layers} layers")
    if num_mla <= 1:
        layers = [0] * num_mla
    else:
        layers = [round(i * (num_layers - 1) / (num_mla - 1)) for i in range(num_mla)]
    return Selection(layers, [], [f"{num_mla} of {num_layers} layers evenly spaced: {layers}"])


def smart_select(scores: list[float], num_mla: int, keep_terminal: bool = True) -> Selection:
    """Choose `num_mla` layers: terminal layers kept (if asked), near-uniform gaps, maximal total score."""
    n = len(scores)
    trace: list[str] = []
    if not 0 <= num_mla <= n:
        raise ValueError(f"select: cannot place {num_mla} MLA layers in {n} layers")
    if num_mla == 0:
        return Selection([], scores, ["no MLA layers requested"])
    if num_mla == n:
        return Selection(list(range(n)), scores, ["every layer is MLA"])
    if num_mla == 1:
        layer = 0 if keep_terminal else max(range(n), key=lambda i: scores[i])
        return Selection([layer], scores, [f"one MLA layer: {layer} ({'terminal' if keep_terminal else 'best score'})"])
    ideal = (n - 1) / (num_mla - 1)
    lo, hi = max(1, math.floor(ideal * 0.5)), math.ceil(ideal * 1.5)
    trace.append(f"{num_mla} of {n} layers; ideal gap {ideal:.2f}, allowed gaps {lo}..{hi}")
    if keep_terminal:
        trace.append(f"terminal layers 0 and {n - 1} kept as MLA")
        starts, ends = [0], {n - 1}
    else:
        starts, ends = list(range(min(hi, n))), set(range(max(n - hi, 0), n))
    # best[k][i]: best total score of k+1 chosen layers ending at layer i (None: unreachable).
    best: list[list[float | None]] = [[None] * n for _ in range(num_mla)]
    back: list[list[int | None]] = [[None] * n for _ in range(num_mla)]
    for i in starts:
        best[0][i] = scores[i]
    for k in range(1, num_mla):
        for i in range(n):
            for gap in range(lo, hi + 1):
                j = i - gap
                if j >= 0 and best[k - 1][j] is not None:
                    value = best[k - 1][j] + scores[i]
                    if best[k][i] is None or value > best[k][i]:
                        best[k][i], back[k][i] = value, j
    candidates = [i for i in ends if best[num_mla - 1][i] is not None]
    if not candidates:
        raise ValueError(f"select: no map of {num_mla} layers in {n} satisfies the spacing rule (gaps {lo}..{hi})")
    last = max(candidates, key=lambda i: best[num_mla - 1][i])
    layers = [last]
    for k in range(num_mla - 1, 0, -1):
        layers.append(back[k][layers[-1]])
    layers.reverse()
    trace.append(f"chosen {layers}, total sensitivity {best[num_mla - 1][last]:.4f}")
    return Selection(layers, scores, trace)
