"""SMART layer selection (Zebra-Llama): which layers stay attention-like (MLA) and which kind each other layer takes.

Sensitivity of layer i: how much worse the best aligned candidate of a fill kind (select.fill_kinds: Mamba2, GDN)
reproduces the teacher than the aligned candidate of the placed kind (MLA, models/mixers.py PLACED_KIND),
log(L_fill / L_placed) of the held-out ILD losses (scale-free across depths). The rule:
terminal layers are kept as MLA (optional), the MLA layers are spread near-uniformly (every gap between
consecutive MLA layers within +-50 % of the ideal (L-1)/(K-1)), and among the maps that satisfy both, the
one with the largest total sensitivity wins (exact dynamic programming). The number of MLA layers comes
from the user or from a KV-cache budget. Every other layer takes its lowest-loss fill kind.

Under a byte budget (`select_map`): the map above is the optimum of the total log ILD loss sum_i log L_{kind_i, i};
if it fits the budget it is the answer, otherwise an exact dynamic program over (cost, loss) Pareto fronts picks
the MLA layers and each other layer's fill kind together (a cheaper fill kind where the best one does not fit).
Costs are whole bytes, so nothing is discretized; equal losses go to the cheaper map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .mixers import MIXERS, PLACED_KIND, candidate_kinds


@dataclass
class Selection:
    layers: list[int]
    scores: list[float]
    trace: list[str] = field(default_factory=list)
    mixer_types: list[str] = field(default_factory=list)  # select_map: the kind of every layer
    cost: float | None = None  # select_map with costs: the map's bytes under the budget's measure


def _layer_rows(layer_losses: dict, num_layers: int, fill_kinds: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Per layer {kind: loss} of the placed kind and the fill kinds (None: every other measured kind)."""
    placed = PLACED_KIND.name
    rows = []
    for i in range(num_layers):
        row = layer_losses.get(str(i), layer_losses.get(i)) or {}
        wanted = [k for k in row if k != placed and k in MIXERS] if fill_kinds is None else list(fill_kinds)
        if placed not in row or not wanted or any(k not in row for k in wanted):
            need = f"{placed!r} and another of {list(MIXERS)}" if fill_kinds is None else [placed, *wanted]
            raise ValueError(
                f"select: layer {i} has ILD losses of {sorted(row)}, needs {need}; run ild with candidates=both "
                f"and the same select.fill_kinds"
            )
        rows.append({k: max(float(row[k]), 1e-30) for k in [placed, *wanted]})
    return rows


def sensitivity_from_ild(
    layer_losses: dict[str, dict[str, float]], num_layers: int, fill_kinds: Sequence[str] | None = None
) -> list[float]:
    """{layer: {kind name: loss}} -> per-layer log(L_best fill kind / L_placed kind); fill kinds: `fill_kinds`, or
    every other kind measured."""
    placed = PLACED_KIND.name
    rows = _layer_rows(layer_losses, num_layers, fill_kinds)
    return [math.log(min(v for k, v in row.items() if k != placed) / row[placed]) for row in rows]


def best_fill_kinds(
    layer_losses: dict, num_layers: int, fill_kinds: Sequence[str], costs: list[dict[str, float]] | None = None
) -> list[str]:
    """Per layer the fill kind of lowest ILD loss; equal losses: the cheaper (`costs`), then the first named."""
    rows = _layer_rows(layer_losses, num_layers, fill_kinds)
    return [
        min(fill_kinds, key=lambda k: (row[k], costs[i][k] if costs else 0, list(fill_kinds).index(k)))
        for i, row in enumerate(rows)
    ]


def num_mla_for_budget(budget: float, teacher_bytes_per_token: int, mla_bytes_per_layer: int, num_layers: int) -> int:
    """Most MLA layers whose KV cache stays within `budget` (a fraction of the teacher's bytes per token)."""
    if not 0 < budget <= 1:
        raise ValueError(f"student.kv_budget={budget} is invalid: a fraction of the teacher's KV cache in (0, 1]")
    count = int(budget * teacher_bytes_per_token // mla_bytes_per_layer)
    return min(count, num_layers)


SELECT_RULES = ("smart", "uniform")  # select.rule: sensitivity-driven, or the evenly spaced baseline


def check_select_keys(fill_kinds: Sequence[str], context_tokens: int | None) -> None:
    """`select.fill_kinds` (known kinds other than MLA, distinct) and `select.context_tokens` (null or >= 1)."""
    candidate_kinds(fill_kinds)
    if context_tokens is not None and (isinstance(context_tokens, bool) or context_tokens < 1):
        raise ValueError(f"select.context_tokens={context_tokens!r} is invalid: null or a number of tokens >= 1")


def uniform_select(num_layers: int, num_mla: int) -> Selection:
    """The baseline SMART is measured against: `num_mla` layers evenly spaced over the stack, ends included."""
    if not 0 <= num_mla <= num_layers:
        raise ValueError(f"select: cannot place {num_mla} MLA layers in {num_layers} layers")
    if num_mla <= 1:
        layers = [0] * num_mla
    else:
        layers = [round(i * (num_layers - 1) / (num_mla - 1)) for i in range(num_mla)]
    return Selection(layers, [], [f"{num_mla} of {num_layers} layers evenly spaced: {layers}"])


def _spacing(n: int, num_mla: int, keep_terminal: bool) -> tuple[int, int, list[int], set[int]]:
    """The spacing rule of num_mla >= 2 layers in n: allowed gaps lo..hi, possible first and last layers."""
    ideal = (n - 1) / (num_mla - 1)
    lo, hi = max(1, math.floor(ideal * 0.5)), math.ceil(ideal * 1.5)
    if keep_terminal:
        return lo, hi, [0], {n - 1}
    return lo, hi, list(range(min(hi, n))), set(range(max(n - hi, 0), n))


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
    lo, hi, starts, ends = _spacing(n, num_mla, keep_terminal)
    trace.append(f"{num_mla} of {n} layers; ideal gap {(n - 1) / (num_mla - 1):.2f}, allowed gaps {lo}..{hi}")
    if keep_terminal:
        trace.append(f"terminal layers 0 and {n - 1} kept as MLA")
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


# ------------------------------------------------------------------------------------- under a byte budget

Front = list[tuple[float, float, tuple[str, ...]]]  # (bytes, value, kinds of the layers covered), Pareto-optimal


def _pareto(entries, budget: float) -> Front:
    """Within budget; per cost the best value, and only entries worth more than every cheaper one."""
    kept: Front = []
    for entry in sorted((e for e in entries if e[0] <= budget), key=lambda e: (e[0], -e[1])):
        if not kept or entry[1] > kept[-1][1]:
            kept.append(entry)
    return kept


def _join(left: Front, right: Front, budget: float) -> Front:
    """Layers of `left` then of `right`: costs and values add (the loss is a sum over layers)."""
    return _pareto([(cl + cr, vl + vr, kl + kr) for cl, vl, kl in left for cr, vr, kr in right], budget)


def budgeted_select(
    values: list[dict[str, float]],
    costs: list[dict[str, float]],
    fill_kinds: Sequence[str],
    num_mla: int,
    budget: float,
    keep_terminal: bool = True,
) -> tuple[list[str], float, float] | None:
    """The per-layer map of `num_mla` placed layers (spacing rule as smart_select's) and a fill kind elsewhere of
    largest total value within `budget` bytes: (kinds, value, bytes), or None when nothing fits. Exact: a partial
    map dominated by one no dearer and no worse cannot complete better, since the rest adds the same to both."""
    n, placed = len(values), PLACED_KIND.name
    if not 0 <= num_mla <= n:
        raise ValueError(f"select: cannot place {num_mla} MLA layers in {n} layers")
    memo: dict[tuple[int, int], Front] = {}

    def fills(a: int, b: int) -> Front:  # layers a..b-1, each of a fill kind
        if (a, b) not in memo:
            front: Front = [(0.0, 0.0, ())]
            for i in range(a, b):
                front = _join(front, [(costs[i][k], values[i][k], (k,)) for k in fill_kinds], budget)
            memo[(a, b)] = front
        return memo[(a, b)]

    def place(i: int) -> Front:
        return [(costs[i][placed], values[i][placed], (placed,))]

    if num_mla == 0:
        final = fills(0, n)
    else:
        if num_mla == 1:
            lo, hi, starts, ends = 1, n, [0] if keep_terminal else list(range(n)), set(range(n))
        else:
            lo, hi, starts, ends = _spacing(n, num_mla, keep_terminal)
        fronts = {i: _join(fills(0, i), place(i), budget) for i in starts}  # one placed layer, the last at i
        for _ in range(1, num_mla):
            fronts = {
                i: _pareto([e for j in range(i - hi, i - lo + 1) if j in fronts for e in
                            _join(_join(fronts[j], fills(j + 1, i), budget), place(i), budget)], budget)
                for i in range(n)
            }  # fmt: skip
        final = _pareto([e for i in ends if i in fronts for e in _join(fronts[i], fills(i + 1, n), budget)], budget)
    if not final:
        return None
    cost, value, kinds = max(final, key=lambda e: e[1])  # a Pareto front: equal values only at the cheapest
    return list(kinds), value, cost


def select_map(
    layer_losses: dict,
    num_layers: int,
    fill_kinds: Sequence[str],
    num_mla: int | None,
    costs: list[dict[str, float]] | None = None,
    budget: float | None = None,
    keep_terminal: bool = True,
    rule: str = "smart",
) -> Selection:
    """The per-layer map from ILD losses: `num_mla` MLA layers (None: the most that `budget` allows) by `rule`,
    every other layer its lowest-loss fill kind; under `budget` (bytes, each layer and kind costing `costs`), the
    exact budgeted program when that map does not fit (the module docstring)."""
    placed = PLACED_KIND.name
    rows = _layer_rows(layer_losses, num_layers, fill_kinds)
    scores = sensitivity_from_ild(layer_losses, num_layers, fill_kinds)
    best = best_fill_kinds(layer_losses, num_layers, fill_kinds, costs)
    if budget is not None and costs is None:
        raise ValueError("select: a budget needs per-layer costs")
    limit = math.inf if budget is None else budget
    values = [{k: -math.log(v) for k, v in row.items()} for row in rows]
    if num_mla is None:
        if budget is None:
            raise ValueError("select: num_mla=None needs a budget (student.kv_budget)")
        num_mla = _most_that_fit(values, costs, fill_kinds, budget, keep_terminal, rule)
    if rule == "uniform":
        selection = uniform_select(num_layers, num_mla)
    else:
        selection = smart_select(scores, num_mla, keep_terminal)
    chosen = set(selection.layers)
    kinds = [placed if i in chosen else best[i] for i in range(num_layers)]
    cost = None if costs is None else sum(costs[i][k] for i, k in enumerate(kinds))
    if cost is not None and cost > limit:
        selection.trace.append(f"{kinds} costs {cost:.0f} bytes, over the budget: budgeted choice")
        if rule == "uniform":  # the baseline keeps its layers; only the fill kinds may change
            found = _fit_fills(values, costs, fill_kinds, chosen, limit)
        else:
            found = budgeted_select(values, costs, fill_kinds, num_mla, limit, keep_terminal)
        if found is None:
            raise ValueError(f"select: no map of {num_mla} MLA layers fits the budget of {budget:.0f} bytes")
        kinds, _, cost = found
        selection.layers = [i for i, k in enumerate(kinds) if k == placed]
    selection.scores, selection.mixer_types, selection.cost = scores, kinds, cost
    if budget is not None:
        selection.trace.append(f"chosen {kinds}: {cost:.0f} bytes of a budget of {budget:.0f}")
    return selection


def _fit_fills(values, costs, fill_kinds, placed_layers: set[int], budget: float) -> tuple | None:
    """Fixed placed layers; the fill kinds of largest total value within `budget`."""
    n, placed = len(values), PLACED_KIND.name
    front: Front = [(0.0, 0.0, ())]
    for i in range(n):
        kinds = [placed] if i in placed_layers else list(fill_kinds)
        front = _join(front, [(costs[i][k], values[i][k], (k,)) for k in kinds], budget)
    if not front:
        return None
    cost, value, kinds = max(front, key=lambda e: e[1])
    return list(kinds), value, cost


def _most_that_fit(values, costs, fill_kinds, budget: float, keep_terminal: bool, rule: str) -> int:
    """The most placed layers of any map within `budget` (cheapest fill kinds elsewhere)."""
    n, placed = len(values), PLACED_KIND.name
    cheapest = [min(costs[i][k] for k in fill_kinds) for i in range(n)]
    extra = sorted(costs[i][placed] - cheapest[i] for i in range(n))
    bound = 0  # no spacing rule: the cheapest extra costs first; an upper bound of the count
    while bound < n and sum(cheapest) + sum(extra[: bound + 1]) <= budget:
        bound += 1
    cost_only = [{k: 0.0 for k in row} for row in values]  # feasibility alone
    for count in range(bound, -1, -1):
        if rule == "uniform":
            layers = set(uniform_select(n, count).layers)
            if _fit_fills(cost_only, costs, fill_kinds, layers, budget) is not None:
                return count
        elif budgeted_select(cost_only, costs, fill_kinds, count, budget, keep_terminal) is not None:
            return count
    raise ValueError(f"select: even no MLA layer fits the budget of {budget:.0f} bytes")
