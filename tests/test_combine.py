"""lrp's selection, rescaling and sign rules against hand computation."""

from pathlib import Path

import pytest
import torch
from helpers import TOPK_RULE
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_lrp.merging.combine import combine
from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.merging.selection import Selection, keep_probabilities
from mergekit_lrp.scores.file import ScoreMetadata, write_scores


def scores_file(path: Path, values: torch.Tensor) -> str:
    meta = ScoreMetadata(
        model_fingerprint="x", num_prompts=1, num_tokens=1, target="predicted", model_type="llama"
    )
    write_scores(path, {"w": values}, meta)
    return str(path)


def merge(tmp_path, deltas, scores, **parameters) -> torch.Tensor:
    base = torch.zeros_like(deltas[0])
    models = {"base": {"w": base}}
    paths = {}
    for index, (delta, score) in enumerate(zip(deltas, scores, strict=True)):
        models[f"m{index}"] = {"w": base + delta}
        paths[f"m{index}"] = scores_file(tmp_path / f"s{index}.safetensors", score)
    parameters = {"lrp_scores": paths, "density": 1.0, **TOPK_RULE, **parameters}
    return merge_state_dicts(models, "lrp", base="base", parameters=parameters)["w"]


# two models, one row of four entries; scores chosen so relevance and magnitude disagree
DELTAS = [torch.tensor([[3.0, -1.0, 2.0, 1.0]]), torch.tensor([[-1.0, 2.0, -4.0, 1.0]])]
SCORES = [torch.tensor([[1.0, 9.0, 1.0, 1.0]]), torch.tensor([[30.0, 1.0, 1.0, 1.0]])]
ALL = 0.99  # keeps all four entries, and the scores are read (at density 1 they are not)


def test_relevance_sign_election_differs_from_magnitude_election(tmp_path):
    """Entry 0: magnitudes 3 vs 1 elect +, importances |d|*s = 3 vs 30 elect -.
    Entry 1: magnitudes 1 vs 2 elect +, importances 9 vs 2 elect -."""
    ties = merge(tmp_path, DELTAS, SCORES, consensus="sum", density=ALL)
    relevance = merge(tmp_path, DELTAS, SCORES, consensus="relevance", density=ALL)
    # comparable importances: each model's |d|*s divided by its mean over the tensor
    imp = [(d.abs() * s) for d, s in zip(DELTAS, SCORES, strict=True)]
    imp = [i / i.mean() for i in imp]
    elected = torch.sign(imp[0] * DELTAS[0] + imp[1] * DELTAS[1])
    expected = sum(torch.where(torch.sign(d) == elected, d, torch.zeros_like(d)) for d in DELTAS)
    torch.testing.assert_close(relevance, expected)
    assert relevance[0, 0] == -1.0 and ties[0, 0] == 3.0
    assert relevance[0, 1] == -1.0 and ties[0, 1] == 2.0


def test_winner_and_drop_resolve_only_the_conflicting_entries(tmp_path):
    winner = merge(tmp_path, DELTAS, SCORES, consensus="winner", density=ALL)
    drop = merge(tmp_path, DELTAS, SCORES, consensus="drop", density=ALL)
    # entries 0-2 conflict; entry 3 (1 and 1) agrees and is summed by both
    # normalised importances: m0 [3, 9, 2, 1] / 3.75, m1 [30, 2, 4, 1] / 9.25
    assert winner.tolist() == [[-1.0, -1.0, 2.0, 2.0]]
    assert drop.tolist() == [[0.0, 0.0, 0.0, 2.0]]


def test_priority_gives_conflicts_to_the_first_listed_model(tmp_path):
    """Entries 0-2 conflict and go to m0 whatever the magnitudes or scores; entry 3
    agrees; with normalize, agreeing entries are averaged and lone ones kept whole."""
    third = torch.tensor([[2.0, 0.0, -2.0, 3.0]])  # agrees with m1 on 2, with m0 on 0, 3
    deltas, scores = [*DELTAS, third], [*SCORES, torch.tensor([[1.0, 2.0, 3.0, 4.0]])]
    priority = merge(tmp_path, deltas, scores, consensus="priority", density=ALL)
    assert priority.tolist() == [[3.0 + 2.0, -1.0, 2.0, 1.0 + 1.0 + 3.0]]
    averaged = merge(tmp_path, deltas, scores, consensus="priority", normalize=True, density=ALL)
    torch.testing.assert_close(averaged, torch.tensor([[2.5, -1.0, 2.0, 5.0 / 3]]))
    reversed_order = merge(tmp_path, deltas[::-1], scores[::-1], consensus="priority", density=ALL)
    assert reversed_order.tolist() == [[2.0 + 3.0, 2.0, -6.0, 5.0]]


UNIT_DELTAS = [torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[-3.0, 0.0], [-1.0, -1.0]])]
UNIT_SCORES = [torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 1.0]])]


def test_unit_gives_each_rows_conflicts_to_the_model_of_larger_mass_there(tmp_path):
    """Comparable importances (each divided by its mean): m0 [[1, 2], [1, 0]], m1
    [[2, 0], [4/3, 2/3]]. Row 0: mass 3 against 2, m0 wins (+1 over -3); row 1: 1 against
    2, m1 wins (-1 over +1). By kept |delta| instead: row 0 is m1's (3 against 2)."""
    unit = merge(tmp_path, UNIT_DELTAS, UNIT_SCORES, consensus="unit", density=ALL)
    assert unit.tolist() == [[1.0, 1.0], [-1.0, -1.0]]
    magnitude = merge(
        tmp_path, UNIT_DELTAS, UNIT_SCORES, consensus="unit", unit_mass="magnitude", density=ALL
    )
    assert magnitude.tolist() == [[-3.0, 1.0], [-1.0, -1.0]]
    priority = merge(tmp_path, UNIT_DELTAS, UNIT_SCORES, consensus="priority", density=ALL)
    assert priority.tolist() == [[1.0, 1.0], [1.0, -1.0]]
    listed_the_other_way = merge(
        tmp_path, UNIT_DELTAS[::-1], UNIT_SCORES[::-1], consensus="unit", density=ALL
    )
    assert listed_the_other_way.tolist() == unit.tolist()


def test_unit_on_a_tensor_without_output_units_says_what_it_does_instead(tmp_path):
    from mergekit_lrp.merging import combine as combine_module

    combine_module._REPORTED.clear()
    deltas = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, 1.0, 1.0])]
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    with pytest.warns(UserWarning, match="consensus: unit on .* 1-D tensors .* entry by entry"):
        merged = merge(tmp_path, deltas, scores, consensus="unit", density=ALL)
    winner = merge(tmp_path, deltas, scores, consensus="winner", density=ALL)
    assert merged.tolist() == winner.tolist()  # two models: the larger mass alone wins


def test_mass_rescale_divides_by_the_kept_share_of_importance():
    delta = torch.tensor([4.0, 3.0, 2.0, 1.0])
    importance = torch.tensor([5.0, 3.0, 1.0, 1.0])
    kept, kept_importance = Selection("topk", rescale="mass").select(delta, importance, 0.5)
    share = (5.0 + 3.0) / 10.0
    assert kept.tolist() == [4.0 / share, 3.0 / share, 0.0, 0.0]
    assert kept_importance.tolist() == [5.0, 3.0, 0.0, 0.0]
    by_density, _ = Selection("topk", rescale=True).select(delta, importance, 0.5)
    assert by_density.tolist() == [8.0, 6.0, 0.0, 0.0]


def test_stochastic_probabilities_rise_with_importance_rank():
    importance = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7])
    p = keep_probabilities(importance, density=0.5, epsilon=0.2)
    # ranks 1, 0, 4, 2, 3 of 4 -> 0.3 + 0.4 * rank / 4
    torch.testing.assert_close(p, torch.tensor([0.4, 0.3, 0.7, 0.5, 0.6]))
    assert abs(float(p.mean()) - 0.5) < 1e-6


def test_stochastic_selection_is_unbiased_and_seeded():
    torch.manual_seed(0)
    delta, importance = torch.randn(200, 50), torch.rand(200, 50)
    runs = []
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        kept, _ = Selection("stochastic", 0.2).select(delta, importance, 0.5, generator)
        runs.append(kept)
    mean = torch.stack(runs).mean(dim=0)
    assert float((mean - delta).abs().mean()) < 0.2 * float(delta.abs().mean())
    generator = torch.Generator().manual_seed(0)
    again, _ = Selection("stochastic", 0.2).select(delta, importance, 0.5, generator)
    assert torch.equal(again, runs[0]) and not torch.equal(runs[0], runs[1])


def test_stochastic_merge_is_deterministic_for_a_random_seed(tmp_path):
    torch.manual_seed(1)
    deltas = [torch.randn(8, 8), torch.randn(8, 8)]
    scores = [torch.rand(8, 8), torch.rand(8, 8)]
    settings = {"density": 0.5, "selection": "stochastic", "epsilon": 0.2}
    torch.manual_seed(7)
    first = merge(tmp_path, deltas, scores, **settings)
    torch.manual_seed(7)
    second = merge(tmp_path, deltas, scores, **settings)
    torch.manual_seed(8)
    other = merge(tmp_path, deltas, scores, **settings)
    assert torch.equal(first, second) and not torch.equal(first, other)


@pytest.mark.parametrize("density", [0.04, 0.5, 0.97])
def test_stochastic_without_epsilon_narrows_it_near_0_and_1(tmp_path, density):
    """Unset, epsilon is 0.1 where that fits and narrower near 0 and 1: the merge runs
    where an explicit 0.1 is refused, and draws as the narrowed epsilon does."""
    torch.manual_seed(1)
    deltas, scores = [torch.randn(16, 16)], [torch.rand(16, 16)]
    spread = min(0.1, density / 2, (1 - density) / 2)
    torch.manual_seed(3)
    unset = merge(tmp_path, deltas, scores, density=density, selection="stochastic")
    torch.manual_seed(3)
    given = merge(tmp_path, deltas, scores, density=density, selection="stochastic", epsilon=spread)
    assert torch.equal(unset, given)
    if spread < 0.1:
        with pytest.raises(LRPConfigError, match="density ± epsilon"):
            merge(tmp_path, deltas, scores, density=density, selection="stochastic", epsilon=0.1)


def test_consensus_none_and_normalize_match_the_plain_sum():
    weighted = [DELTAS[0] * 0.5, DELTAS[1] * 2.0]
    mixed, divisor = combine(weighted, [0.5, 2.0], None, "none")
    torch.testing.assert_close(mixed, weighted[0] + weighted[1])
    torch.testing.assert_close(divisor, torch.full((1, 4), 2.5))


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"selection": "random"}, "selection must be one of topk, stochastic"),
        ({"consensus": "vote"}, "consensus must be one of none, sum, count, relevance"),
        ({"unit_mass": "rows"}, "unit_mass must be one of importance, magnitude"),
        ({"rescale": "entries"}, "rescale must be true, false or mass"),
        ({"selection": "stochastic", "density": 0.1, "epsilon": 0.2}, "density ± epsilon"),
    ],
)
def test_new_parameters_are_validated(tmp_path, parameters, fragment):
    with pytest.raises(LRPConfigError, match=fragment):
        merge(tmp_path, DELTAS, SCORES, **parameters)


def test_defaults_are_the_rule_chosen_on_the_benchmark(tmp_path):
    """No rule given: density 0.9, top-k by |theta| x score, no sign rule, each entry
    divided by the summed weights of the models that kept it (docs/BENCHMARKS.md,
    "Choosing the defaults")."""
    torch.manual_seed(2)
    base = torch.randn(12, 12)  # not zero: |theta| and |delta| rank differently
    models = {"base": {"w": base}}
    paths = {}
    for index in range(3):
        models[f"m{index}"] = {"w": base + torch.randn(12, 12)}
        paths[f"m{index}"] = scores_file(tmp_path / f"s{index}.safetensors", torch.rand(12, 12))

    def merged(**rule):
        torch.manual_seed(5)
        parameters = {"lrp_scores": paths, **rule}
        return merge_state_dicts(models, "lrp", base="base", parameters=parameters)["w"]

    chosen = dict(density=0.9, importance="weight", **{**TOPK_RULE, "normalize": True})
    assert torch.equal(merged(), merged(**chosen))
    for other in ({"importance": "delta"}, {"normalize": False}, {"density": 0.5},
                  {"consensus": "sum"}, {"selection": "stochastic"}):
        assert not torch.equal(merged(), merged(**{**chosen, **other})), other
