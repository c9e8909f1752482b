"""SMART selection: picks the clearly most sensitive layer, respects the KV budget, keeps terminal layers."""

import itertools

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
