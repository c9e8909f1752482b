"""SMART selection: picks the clearly most sensitive layer, respects the KV budget, keeps terminal layers."""

import itertools
import math

import pytest

from models.select import num_mla_for_budget, sensitivity_from_ild, smart_select


def test_clearly_most_sensitive_layer_is_chosen():
    for hot in range(3, 13):  # any interior layer the spacing rule can reach
        scores = [0.1] * 16
        scores[hot] = 5.0
        chosen = smart_select(scores, 4, keep_terminal=True).layers
        assert hot in chosen, (hot, chosen)
        assert chosen[0] == 0 and chosen[-1] == 15


def test_dynamic_program_is_optimal_among_valid_maps():
    scores = [0.3, 1.2, 0.1, 0.9, 2.0, 0.2, 0.4, 1.5, 0.3, 0.8, 0.1, 0.6]
    selection = smart_select(scores, 4, keep_terminal=True)
    lo, hi = 1, 6  # ideal gap 11/3: floor(ideal / 2), ceil(1.5 * ideal)
    best = max(
        (
            c
            for c in itertools.combinations(range(12), 4)
            if c[0] == 0 and c[-1] == 11 and all(lo <= b - a <= hi for a, b in itertools.pairwise(c))
        ),
        key=lambda c: sum(scores[i] for i in c),
    )
    assert selection.layers == list(best)
    assert any("terminal" in line for line in selection.trace)


def test_without_terminal_rule_the_ends_are_free():
    scores = [0.0] * 10
    scores[1], scores[8] = 3.0, 3.0
    assert smart_select(scores, 2, keep_terminal=False).layers == [1, 8]
    assert smart_select(scores, 2, keep_terminal=True).layers == [0, 9]


@pytest.mark.parametrize("budget", [0.02, 0.04, 0.08, 0.25, 1.0])
def test_kv_budget_is_never_exceeded(budget):
    teacher, per_layer = 16 * 2 * 8 * 64 * 2, (128 + 32) * 2  # zebra_1b shapes, bf16
    count = num_mla_for_budget(budget, teacher, per_layer, 16)
    assert count * per_layer <= budget * teacher
    assert (count + 1) * per_layer > budget * teacher or count == 16
    assert len(smart_select([0.0] * 16, count).layers) == count


def test_scores_come_from_both_candidates():
    losses = {"0": {"mla": 0.1, "mamba": 0.4}, "1": {"mla": 0.2, "mamba": 0.2}}
    scores = sensitivity_from_ild(losses, 2)
    assert scores[0] > scores[1] == 0.0
    with pytest.raises(ValueError, match="candidates=both"):
        sensitivity_from_ild({"0": {"assigned": 0.1}}, 1)


def test_uniform_select_spaces_layers_evenly_with_both_ends():
    from models.select import uniform_select

    assert uniform_select(30, 8).layers == [0, 4, 8, 12, 17, 21, 25, 29]
    assert uniform_select(16, 4).layers == [0, 5, 10, 15]
    assert uniform_select(4, 4).layers == [0, 1, 2, 3] and uniform_select(4, 0).layers == []
    with pytest.raises(ValueError, match="cannot place 5"):
        uniform_select(4, 5)


# ------------------------------------------------------------------------- several fill kinds, a byte budget

PLACED, MAMBA, GDN = "mla", "mamba", "gdn"


def _rule_ok(kinds: list[str], count: int, keep_terminal: bool) -> bool:
    """The spacing rule, restated from the module docstring: gaps within +-50 % of (n-1)/(count-1), ends kept."""
    n, layers = len(kinds), [i for i, k in enumerate(kinds) if k == PLACED]
    if len(layers) != count:
        return False
    if count == 1:
        return layers == [0] or not keep_terminal
    if count in (0, n):
        return True
    ideal = (n - 1) / (count - 1)
    lo, hi = max(1, int(ideal * 0.5)), -int(-ideal * 1.5 // 1)
    gaps_ok = all(lo <= b - a <= hi for a, b in itertools.pairwise(layers))
    if keep_terminal:
        return gaps_ok and layers[0] == 0 and layers[-1] == n - 1
    return gaps_ok and layers[0] < hi and layers[-1] >= n - hi


def _brute_force(losses, costs, fills, count, budget, keep_terminal):
    """The best total -sum log loss of every rule-abiding map within budget, by enumeration."""
    n, best = len(losses), None
    for kinds in itertools.product([PLACED, *fills], repeat=n):
        if not _rule_ok(list(kinds), count, keep_terminal):
            continue
        if sum(costs[i][k] for i, k in enumerate(kinds)) > budget:
            continue
        value = -sum(math.log(losses[str(i)][k]) for i, k in enumerate(kinds))
        best = value if best is None else max(best, value)
    return best


def test_default_fill_kinds_give_todays_selection():
    from models.select import select_map

    losses = {str(i): {PLACED: 0.1 + 0.05 * (i % 3), MAMBA: 0.2 + 0.1 * ((i * 7) % 5)} for i in range(12)}
    today = smart_select(sensitivity_from_ild(losses, 12), 4, keep_terminal=True)
    chosen = select_map(losses, 12, [MAMBA], 4)
    assert chosen.layers == today.layers and chosen.scores == today.scores
    assert chosen.mixer_types == [PLACED if i in today.layers else MAMBA for i in range(12)]
    # A per-token budget (MLA 320 B per token, Mamba2 none) places as many layers as num_mla_for_budget did.
    costs = [{PLACED: 320, MAMBA: 0}] * 12
    teacher = 12 * 2 * 2 * 64 * 2
    for budget in (0.1, 0.25, 0.5):
        count = num_mla_for_budget(budget, teacher, 320, 12)
        got = select_map(losses, 12, [MAMBA], None, costs, budget * teacher)
        assert got.layers == smart_select(sensitivity_from_ild(losses, 12), count).layers
        assert got.cost == 320 * count <= budget * teacher


def test_each_fill_layer_takes_its_lowest_loss_kind():
    from models.select import select_map

    losses = {str(i): {PLACED: 0.1, MAMBA: 0.3, GDN: 0.4} for i in range(8)}
    losses["3"][GDN] = 0.2  # GDN beats Mamba2 here only
    losses["5"][GDN] = losses["5"][MAMBA]  # a tie: the cheaper kind
    costs = [{PLACED: 1000, MAMBA: 50, GDN: 60}] * 8
    chosen = select_map(losses, 8, [GDN, MAMBA], 2, costs)  # GDN named first: the tie still goes by cost
    assert chosen.mixer_types == [PLACED, MAMBA, MAMBA, GDN, MAMBA, MAMBA, MAMBA, PLACED]
    # Sensitivity against the best fill kind: layer 3's is log(0.2 / 0.1).
    assert chosen.scores[3] == pytest.approx(math.log(2.0)) and chosen.scores[2] == pytest.approx(math.log(3.0))


def test_budget_is_respected_by_swapping_fill_kinds():
    from models.select import select_map

    losses = {str(i): {PLACED: 0.1, MAMBA: 0.4, GDN: 0.2 + 0.01 * i} for i in range(6)}  # GDN best everywhere
    costs = [{PLACED: 100, MAMBA: 10, GDN: 30}] * 6
    budget = 2 * 100 + 2 * 30 + 2 * 10  # two MLA layers, room for only two GDN layers
    chosen = select_map(losses, 6, [MAMBA, GDN], 2, costs, budget)
    kinds = chosen.mixer_types
    assert kinds[0] == kinds[-1] == PLACED and kinds.count(PLACED) == 2  # terminal rule kept
    assert chosen.cost == sum(costs[i][k] for i, k in enumerate(kinds)) <= budget
    assert kinds[1:5] == [GDN, GDN, MAMBA, MAMBA]  # GDN where it is best (lowest loss: layers 1, 2)
    # Nothing fits: one line naming the budget.
    with pytest.raises(ValueError, match="fits the budget of 200 bytes"):
        select_map(losses, 6, [MAMBA, GDN], 2, costs, 200)


def test_budget_with_constant_state_sets_the_count():
    from models.select import select_map

    losses = {str(i): {PLACED: 0.1, MAMBA: 0.3, GDN: 0.25} for i in range(8)}
    tokens = 1000  # MLA 320 B per token; fills a constant state: Mamba2 40 kB, GDN 60 kB
    costs = [{PLACED: 320 * tokens, MAMBA: 40_000, GDN: 60_000}] * 8
    budget = 0.2 * 8 * 512 * tokens  # kv_budget 0.2 of a teacher with 512 B per token and layer
    chosen = select_map(losses, 8, [MAMBA, GDN], None, costs, budget)
    # Two MLA layers and six of the cheapest fill: 640 + 240 = 880 kB > 819.2 kB; one MLA layer and seven GDN
    # layers (GDN's loss is lower everywhere): 320 + 420 = 740 kB fit.
    assert chosen.mixer_types == [PLACED] + [GDN] * 7 and chosen.cost == 740_000 <= budget
    assert _brute_force(losses, costs, [MAMBA, GDN], 2, budget, True) is None  # two do not fit any way


@pytest.mark.parametrize("seed", range(6))
def test_budgeted_program_is_exact(seed):
    import random

    from models.select import budgeted_select

    rng = random.Random(seed)
    n, fills = 7, [MAMBA, GDN]
    losses = {str(i): {k: rng.uniform(0.05, 1.0) for k in (PLACED, *fills)} for i in range(n)}
    costs = [{PLACED: rng.randint(50, 120), MAMBA: rng.randint(0, 30), GDN: rng.randint(0, 30)} for _ in range(n)]
    values = [{k: -math.log(v) for k, v in losses[str(i)].items()} for i in range(n)]
    for count, keep_terminal in itertools.product(range(0, 5), (True, False)):
        for budget in (150, 260, 400, 10_000):
            want = _brute_force(losses, costs, fills, count, budget, keep_terminal)
            got = budgeted_select(values, costs, fills, count, budget, keep_terminal)
            if want is None:
                assert got is None, (count, keep_terminal, budget)
                continue
            kinds, value, cost = got
            assert value == pytest.approx(want), (count, keep_terminal, budget)
            assert _rule_ok(kinds, count, keep_terminal)
            assert cost == sum(costs[i][k] for i, k in enumerate(kinds)) <= budget


def test_fill_kinds_are_checked():
    from models.mixers import candidate_kinds
    from models.select import check_select_keys

    assert candidate_kinds([MAMBA, GDN]) == [PLACED, MAMBA, GDN]
    assert candidate_kinds() == candidate_kinds([MAMBA])  # the registry's default set is select's default
    for bad in ([], [MAMBA, MAMBA], [PLACED], ["gru"]):
        with pytest.raises(ValueError, match=r"select.fill_kinds=.* is invalid: .*\['mamba', 'gdn'\]"):
            candidate_kinds(bad)
    with pytest.raises(ValueError, match="select.context_tokens=0 is invalid"):
        check_select_keys([MAMBA], 0)
    with pytest.raises(ValueError, match=r"needs \['mla', 'mamba', 'gdn'\]"):
        sensitivity_from_ild({"0": {PLACED: 0.1, MAMBA: 0.2}}, 1, [MAMBA, GDN])
