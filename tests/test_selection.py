"""The stochastic selection's approximate ranks against exact ones: the stated bound on
adversarial tensors, exact ranks below the threshold, the same mask for the same seed;
and the priority combination against the stacked formulation it replaced, bit for bit."""

import pytest
import torch
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_lrp.merging.combine import combine
from mergekit_lrp.merging.selection import (
    EXACT_RANKS_BELOW,
    RANK_TOLERANCE,
    Selection,
    draw,
    exact_keep_probabilities,
    generator_for,
    keep_probabilities,
)
from mergekit_lrp.scores.file import ScoreMetadata, write_scores

N = EXACT_RANKS_BELOW


def adversarial(name: str) -> torch.Tensor:
    """Importances built to defeat a histogram: one bin holding everything, ties, values
    spread over the whole float range, sizes at the threshold."""
    g = torch.Generator().manual_seed(0)
    n = 3 * N
    uniform = torch.rand(n, generator=g)
    if name == "smooth":  # |delta| * s, the usual shape
        return torch.randn(n, generator=g).abs() * uniform
    if name == "narrow":  # every value in one bin of the first histogram
        return 1 + 1e-3 * uniform
    if name == "narrower than float32":  # a few distinct values: large ties
        return 1 + 1e-6 * uniform
    if name == "three values":
        return torch.randint(0, 3, (n,), generator=g).float()
    if name == "huge range":  # denormals to 1e38, and zeros
        values = torch.exp(torch.randn(n, generator=g) * 40).clamp(max=1e38)
        values[:100] = 0
        values[100:200] = 1e-44
        return values
    if name == "outliers around a cluster":  # coarse first bins, a dense cluster inside one
        values = 1 + 1e-4 * uniform
        values[:3] = torch.tensor([1e-30, 1e30, 0.0])
        return values
    if name == "half zeros, some -0.0":
        values = torch.where(uniform < 0.5, 0.0, torch.rand(n, generator=g))
        values[:1000] = -0.0
        return values
    if name == "two clusters, ties inside":
        values = torch.where(uniform < 0.3, 2.0, 5 + 1e-5 * torch.rand(n, generator=g))
        return values
    if name == "at the threshold":
        return torch.rand(N, generator=g) * torch.rand(N, generator=g)
    if name == "one above the threshold, narrow":
        return 1 + 1e-4 * torch.rand(N + 1, generator=g)
    raise KeyError(name)


CASES = [
    "smooth",
    "narrow",
    "narrower than float32",
    "three values",
    "huge range",
    "outliers around a cluster",
    "half zeros, some -0.0",
    "two clusters, ties inside",
    "at the threshold",
    "one above the threshold, narrow",
]


def assert_within_bound(importance, p, exact, epsilon):
    """|p - p_exact| <= RANK_TOLERANCE for every entry whose value more than
    1 + RANK_TOLERANCE * (n - 1) / epsilon entries do not share; such a tie group gets
    one probability, the mean of its exact ones."""
    n = importance.numel()
    limit = 1 + int(RANK_TOLERANCE * (n - 1) / epsilon)
    values, group, size = torch.unique(importance + 0.0, return_inverse=True, return_counts=True)
    tied = size[group] > limit
    error = torch.where(tied, 0.0, (p - exact).abs())
    assert float(error.max()) <= RANK_TOLERANCE + 1e-6
    mean = torch.zeros(len(values), dtype=torch.float64).index_add_(0, group, exact.double())
    mean /= size
    torch.testing.assert_close(p[tied].double(), mean[group[tied]], atol=1e-6, rtol=0)
    return float(error.max()), int(tied.sum())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("density, epsilon", [(0.9, 0.05), (0.5, 0.1), (0.5, 0.45)])
def test_approximate_ranks_stay_within_the_bound(case, density, epsilon):
    importance = adversarial(case)
    p = keep_probabilities(importance, density, epsilon)
    exact = exact_keep_probabilities(importance, density, epsilon)
    assert importance.numel() >= N  # the approximate path
    assert_within_bound(importance, p, exact, epsilon)
    # ranks averaged over a bin are the bin's ranks averaged: the mean stays the density
    assert abs(float(p.double().mean()) - density) < 1e-6


def test_the_bound_is_not_met_by_one_histogram_alone():
    """The narrow case puts every entry in one bin of the first histogram: without the
    finer levels its error would be about epsilon, 50 times the bound."""
    importance = adversarial("narrow")
    p = keep_probabilities(importance, 0.5, 0.1)
    exact = exact_keep_probabilities(importance, 0.5, 0.1)
    assert float((p - exact).abs().max()) <= RANK_TOLERANCE
    assert float((exact - 0.5).abs().max()) > 0.09  # the spread one bin would flatten


@pytest.mark.parametrize("n", [1, 2, 5, 1000, N - 1])
def test_ranks_are_exact_below_the_threshold(n):
    importance = torch.rand(n, generator=torch.Generator().manual_seed(n))
    importance[: n // 2] = importance[0]  # ties, in index order
    p = keep_probabilities(importance, 0.5, 0.2)
    assert torch.equal(p, exact_keep_probabilities(importance, 0.5, 0.2))
    if n > 1:
        ranks = torch.argsort(torch.argsort(importance, stable=True), stable=True)
        torch.testing.assert_close(p, 0.3 + 0.4 * ranks.float() / (n - 1))


def test_other_float_dtypes_are_ranked_as_float32():
    importance = adversarial("smooth")
    p = keep_probabilities(importance.bfloat16(), 0.5, 0.1)
    exact = exact_keep_probabilities(importance.bfloat16(), 0.5, 0.1)
    assert p.dtype == torch.float32
    assert_within_bound(importance.bfloat16().float(), p, exact, 0.1)


def test_the_same_seed_draws_the_same_mask_whatever_the_threads():
    importance = adversarial("smooth").reshape(-1, 256)
    rule = Selection("stochastic")
    threads = torch.get_num_threads()
    masks = []
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            generator = generator_for("model.layers.0.mlp.up_proj.weight", 1, "cpu", seed=3)
            masks.append(rule.mask(importance, 0.9, generator))
    finally:
        torch.set_num_threads(threads)
    (first, p1), (second, p2), (third, _) = masks
    assert torch.equal(first, second) and torch.equal(first, third) and torch.equal(p1, p2)
    other = rule.mask(importance, 0.9, generator_for("x", 1, "cpu", seed=4))[0]
    assert not torch.equal(first, other)
    assert abs(float(first.float().mean()) - 0.9) < 0.01


def test_draw_is_torch_bernoulli_on_cpu():
    p = torch.rand(100_003, generator=torch.Generator().manual_seed(1))
    drawn = draw(p, torch.Generator().manual_seed(2))
    expected = torch.bernoulli(p, generator=torch.Generator().manual_seed(2)).bool()
    assert torch.equal(drawn, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_probabilities_and_repeats_its_mask():
    importance = adversarial("huge range")
    on_cpu = keep_probabilities(importance, 0.5, 0.1)
    on_cuda = keep_probabilities(importance.cuda(), 0.5, 0.1)
    assert torch.equal(on_cuda.cpu(), on_cpu)
    rule = Selection("stochastic", 0.1)
    masks = [rule.mask(importance.cuda(), 0.5, generator_for("w", 0, "cuda", 5))[0] for _ in "ab"]
    assert torch.equal(*masks)


def test_select_overwrites_the_delta_only_when_asked():
    delta = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    importance = delta.abs()
    original = delta.clone()
    rule = Selection("stochastic")
    kept, _ = rule.select(delta, importance, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(delta, original)
    again, imp = rule.select(delta, importance, 0.9, torch.Generator().manual_seed(1),
                             kept_importance=False, overwrite=True)  # fmt: skip
    assert again is delta and torch.equal(again, kept) and imp is None


def merge_once(tmp_path, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (300, 256)  # above the threshold
    base = torch.randn(shape, generator=g)
    models = {"base": {"model.layers.0.mlp.up_proj.weight": base}}
    paths = {}
    meta = ScoreMetadata(
        model_fingerprint="x", num_prompts=1, num_tokens=1, target="predicted", model_type="llama"
    )
    for index in range(2):
        name = f"m{index}"
        delta = torch.randn(shape, generator=g) * 0.01
        models[name] = {"model.layers.0.mlp.up_proj.weight": base + delta}
        path = tmp_path / f"{name}.safetensors"
        write_scores(path, {"model.layers.0.mlp.up_proj.weight": torch.rand(shape, generator=g)},
                     meta)  # fmt: skip
        paths[name] = str(path)
    torch.manual_seed(seed)  # what mergekit's --random-seed does
    parameters = {"lrp_scores": paths, "selection": "stochastic"}
    merged = merge_state_dicts(models, "lrp", base="base", parameters=parameters)
    return merged["model.layers.0.mlp.up_proj.weight"]


def test_a_stochastic_merge_above_the_threshold_repeats_for_its_seed(tmp_path):
    first, second, other = (merge_once(tmp_path, seed) for seed in (7, 7, 8))
    assert torch.equal(first, second) and not torch.equal(first, other)


def stacked_priority(deltas, weights):
    """The priority rule as it was computed before, on the stacked deltas."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * deltas[0].ndim))
    signs = torch.sign(stacked)
    elected = signs[0].clone()
    for sign in signs[1:]:
        elected = torch.where(elected == 0, sign, elected)
    contributing = (stacked != 0) & (signs == elected)
    mixed = (stacked * contributing).sum(dim=0)
    divisor = (w * contributing).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, mixed / divisor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_priority_gives_the_bits_of_the_stacked_formulation(dtype, count):
    g = torch.Generator().manual_seed(count)
    deltas = []
    for _ in range(count):
        delta = torch.randn(64, 48, generator=g)
        delta[torch.rand(64, 48, generator=g) < 0.4] = 0.0
        delta[:2] = -0.0 * delta[:2].sign()  # signed zeros where no model kept anything
        deltas.append(delta.to(dtype))
    weights = [0.3, 1.0, 0.7, 0.25, 2.0][:count]
    weighted = [d * torch.tensor(w, dtype=dtype) for d, w in zip(deltas, weights, strict=True)]
    expected_sum, expected = stacked_priority(weighted, weights)
    mixed, divisor = combine([d.clone() for d in weighted], weights, None, "priority")
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(mixed.view(bits), expected_sum.view(bits))
    assert torch.equal((mixed / divisor).view(bits), expected.view(bits))
