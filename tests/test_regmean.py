"""RegMean (``merge_method: regmean``): the closed-form solve against hand computations,
through a real merge on a tiny Llama with exact Gram files, the OBS saliency it offers
``lrp``, and every bad input refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gram_files import SEQUENCES, gram_file
from helpers import lrp_config
from merge_runner import mergekit_yaml, read_weights, run
from mergekit.merge_methods.api import merge_state_dicts
from safetensors.torch import load_file

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging import gram_solve as gram_module
from mergekit_lrp.merging.gram_solve import DEFAULT_RIDGE, OBS_RIDGE, forget_factors, solve
from mergekit_lrp.merging.selection import top_k_mask
from mergekit_lrp.scores.file import ScoreMetadata, ScoreReader, write_scores

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"


def least_squares_pair(seed=0, out=3, features=4):
    """Two models' weights of one linear layer and their inputs (more tokens than
    features, so the stacked problem has one solution)."""
    generator = torch.Generator().manual_seed(seed)
    w1, w2, base = (torch.randn(out, features, generator=generator, dtype=torch.float64)
                    for _ in range(3))  # fmt: skip
    x1 = torch.randn(9, features, generator=generator, dtype=torch.float64)
    x2 = torch.randn(7, features, generator=generator, dtype=torch.float64) * 2
    return base, w1, w2, x1, x2


def solve_pair(base, thetas, grams, weights=(1.0, 1.0), alpha=1.0, ridge=0.0):
    return solve(
        base,
        thetas,
        [lambda g=g: g.clone() for g in grams],
        list(weights),
        alpha,
        ridge,
        torch.float64,
        where="layer",
    )


# ------------------------------------------------------------------ the solve by hand


def test_the_solve_is_least_squares_on_the_stacked_inputs():
    """alpha 1, ridge 0: W minimises ||X_1 W^T - X_1 W_1^T||^2 + ||X_2 W^T - X_2 W_2^T||^2,
    the least-squares fit of [X_1; X_2] -> [X_1 W_1^T; X_2 W_2^T], whatever the base."""
    base, w1, w2, x1, x2 = least_squares_pair()
    inputs = torch.cat([x1, x2])
    targets = torch.cat([x1 @ w1.T, x2 @ w2.T])
    expected = torch.linalg.lstsq(inputs, targets).solution.T
    merged = solve_pair(base, [w1, w2], [x1.T @ x1, x2.T @ x2])
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)
    other_base = solve_pair(torch.zeros_like(base), [w1, w2], [x1.T @ x1, x2.T @ x2])
    torch.testing.assert_close(other_base, expected, rtol=1e-10, atol=1e-10)


def test_gram_matrices_converted_a_block_of_rows_at_a_time(monkeypatch):
    """The solve converts each Gram matrix in blocks of rows: blocks of one row give the
    same weight as one block."""
    base, w1, w2, x1, x2 = least_squares_pair(seed=7)
    grams = [x1.T @ x1, x2.T @ x2]
    whole = solve_pair(base, [w1, w2], grams, weights=(2.0, 1.0), alpha=0.7, ridge=0.1)
    monkeypatch.setattr(gram_module, "BLOCK_ENTRIES", 4)  # 4 features: one row a block
    rows = solve_pair(base, [w1, w2], grams, weights=(2.0, 1.0), alpha=0.7, ridge=0.1)
    torch.testing.assert_close(rows, whole, rtol=1e-12, atol=1e-12)


def test_a_weight_scales_the_models_gram_matrix():
    """weight 2 for model 1 is model 1's inputs counted twice."""
    base, w1, w2, x1, x2 = least_squares_pair(seed=1)
    inputs = torch.cat([x1, x1, x2])
    targets = torch.cat([x1 @ w1.T, x1 @ w1.T, x2 @ w2.T])
    expected = torch.linalg.lstsq(inputs, targets).solution.T
    merged = solve_pair(base, [w1, w2], [x1.T @ x1, x2.T @ x2], weights=(2.0, 1.0))
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_alpha_zero_is_the_diagonal_weighted_average():
    """alpha 0: (sum_i W_i D_i)(sum_i D_i)^-1, column j the average of the models'
    columns j weighted by their inputs' squared norms in that feature."""
    base, w1, w2, x1, x2 = least_squares_pair(seed=2)
    d1, d2 = (x1.T @ x1).diagonal(), (x2.T @ x2).diagonal()
    expected = (w1 * d1 + w2 * d2) / (d1 + d2)
    merged = solve_pair(base, [w1, w2], [x1.T @ x1, x2.T @ x2], alpha=0.0)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


def test_alpha_between_scales_the_off_diagonal_entries():
    base, w1, w2, x1, x2 = least_squares_pair(seed=3)
    grams = [x1.T @ x1, x2.T @ x2]
    shrunk = [0.6 * g + 0.4 * torch.diag(g.diagonal()) for g in grams]
    expected = (w1 @ shrunk[0] + w2 @ shrunk[1]) @ torch.linalg.inv(shrunk[0] + shrunk[1])
    merged = solve_pair(base, [w1, w2], grams, alpha=0.6)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_the_ridge_pulls_the_change_towards_the_base():
    base, w1, w2, x1, x2 = least_squares_pair(seed=4)
    grams = [x1.T @ x1, x2.T @ x2]
    summed = grams[0] + grams[1]
    lam = 0.5 * float(summed.diagonal().mean())
    change = ((w1 - base) @ grams[0] + (w2 - base) @ grams[1]) @ torch.linalg.inv(
        summed + lam * torch.eye(4, dtype=torch.float64)
    )
    merged = solve_pair(base, [w1, w2], grams, ridge=0.5)
    torch.testing.assert_close(merged, base + change, rtol=1e-10, atol=1e-10)
    huge = solve_pair(base, [w1, w2], grams, ridge=1e9)
    torch.testing.assert_close(huge, base, rtol=0, atol=1e-6)


def test_float32_solves_close_to_float64():
    base, w1, w2, x1, x2 = (t.float() for t in least_squares_pair(seed=5))
    grams = [x1.T @ x1, x2.T @ x2]
    exact = solve_pair(*(t.double() for t in (base,)), [w1.double(), w2.double()],
                       [g.double() for g in grams], alpha=0.9, ridge=1e-4)  # fmt: skip
    single = solve(base, [w1, w2], [lambda g=g: g.clone() for g in grams], [1.0, 1.0], 0.9,
                   1e-4, torch.float32, where="layer")  # fmt: skip
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "grams, fragment",
    [
        ([torch.diag(torch.tensor([1.0, 0.0, 2.0]))] * 2, "1 input feature(s) are zero"),
        ([torch.ones(3, 3)] * 2, "singular or too ill-conditioned"),  # rank 1
    ],
)
def test_a_singular_gram_is_refused_with_what_to_change(grams, fragment):
    base = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(LrpError, match="layer") as error:
        solve_pair(base, [base + 1, base - 1], [g.double() for g in grams])
    message = str(error.value)
    assert fragment in message and "raise ridge" in message and "\n" not in message


def test_strided_inputs_are_not_mutated(tmp_path):
    """mergekit's conformance check (strided inputs, inputs untouched), with Gram files;
    through merge_state_dicts, the merge of in-memory state dicts."""
    base, w1, w2, x1, x2 = (t.float() for t in least_squares_pair(seed=6, out=4))
    paths = {}
    for key, x in (("a", x1), ("b", x2)):
        meta = ScoreMetadata("-", 1, len(x), "inputs", "test", method="gram",
                             quantity="input_gram", gram_of={"w": "w.input_gram"})  # fmt: skip
        paths[key] = str(tmp_path / f"{key}.safetensors")
        write_scores(paths[key], {"w.input_gram": x.T @ x}, meta)
    models = {"base": {"w": base}, "a": {"w": w1}, "b": {"w": w2}}
    strided = {k: {"w": v["w"].T.contiguous().T} for k, v in models.items()}
    assert not strided["a"]["w"].is_contiguous()
    copies = {k: v["w"].clone() for k, v in strided.items()}
    params = {"lrp_scores": paths}
    expected = merge_state_dicts(models, "regmean", base="base", parameters=params)["w"]
    actual = merge_state_dicts(strided, "regmean", base="base", parameters=params)["w"]
    torch.testing.assert_close(actual, expected)
    for key, tensor in strided.items():
        assert torch.equal(tensor["w"], copies[key])


# ------------------------------------------------------------------ a real merge


@pytest.fixture(scope="module")
def grams(family, tmp_path_factory) -> dict:
    """Exact Gram files of the family's two fine-tunes, each on its own token sequences."""
    root = tmp_path_factory.mktemp("grams")
    own = {"ft_a": SEQUENCES, "ft_b": [list(reversed(s)) for s in SEQUENCES[1:]]}
    return {
        name: gram_file(family[name], root / f"{name}-gram.safetensors", sequences=own[name])
        for name in ("ft_a", "ft_b")
    }


def regmean_config(family, grams, **parameters) -> dict:
    per_model = parameters.pop("per_model", {})
    models = []
    for name in ("ft_a", "ft_b"):
        params = {"lrp_scores": str(grams[name]), **per_model.get(name, {})}
        models.append({"model": str(family[name]), "parameters": params})
    return {
        "merge_method": "regmean",
        "base_model": str(family["base"]),
        "parameters": parameters,
        "models": models,
        "dtype": "float32",
    }


def weights_of(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def by_hand(family, grams, name, alpha=0.9, ridge=DEFAULT_RIDGE, base_gram=None,
            base_weight=1.0) -> torch.Tensor:  # fmt: skip
    base = weights_of(family["base"])[name].double()
    numerator, summed = 0, 0
    members = [(grams[m], family[m], 1.0) for m in ("ft_a", "ft_b")]
    if base_gram is not None:
        members.append((base_gram, family["base"], base_weight))
    for gram_path, model, weight in members:
        g = ScoreReader(gram_path).gram(name).double()
        g = weight * (alpha * g + (1 - alpha) * torch.diag(g.diagonal()))
        numerator = numerator + (weights_of(model)[name].double() - base) @ g
        summed = summed + g
    lam = ridge * float(summed.diagonal().mean())
    identity = torch.eye(summed.shape[0], dtype=torch.float64)
    return base + numerator @ torch.linalg.inv(summed + lam * identity)


def test_a_merge_solves_every_linear_layer_and_averages_the_rest(family, grams, tmp_path):
    merged = run(regmean_config(family, grams), tmp_path / "out")
    for name in (Q, DOWN, "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name].double(), by_hand(family, grams, name),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    a, b = weights_of(family["ft_a"]), weights_of(family["ft_b"])
    for name in (NORM, EMBED):
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)


def test_parameters_reach_the_solve_and_the_other_tensors(family, grams, tmp_path):
    config = regmean_config(family, grams, alpha=0.5, ridge=0.01, other_tensors="task_arithmetic")
    merged = run(config, tmp_path / "out")
    torch.testing.assert_close(merged[Q].double(), by_hand(family, grams, Q, 0.5, 0.01),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    base, a, b = (weights_of(family[n]) for n in ("base", "ft_a", "ft_b"))
    torch.testing.assert_close(merged[NORM], base[NORM] + (a[NORM] - base[NORM])
                               + (b[NORM] - base[NORM]))  # fmt: skip


@pytest.fixture(scope="module")
def base_gram(family, tmp_path_factory) -> Path:
    """The base's own Gram file, on sequences neither fine-tune's file holds."""
    sequences = [[(7 * t + 3) % 50 + 1 for t in range(len(s))] for s in SEQUENCES]
    return gram_file(family["base"], tmp_path_factory.mktemp("base") / "base-gram.safetensors",
                     sequences=sequences)  # fmt: skip


def test_the_base_joins_the_solve_with_its_gram_matrices_and_weight(
    family, grams, base_gram, tmp_path
):
    """base_scores: the base as a third member with zero change, its Gram matrices
    scaled by base_weight; the heavier the base, the closer the merge to it."""
    plain = run(regmean_config(family, grams), tmp_path / "plain")
    held = {}
    for weight in (2.0, 8.0):
        config = regmean_config(family, grams, base_scores=str(base_gram), base_weight=weight)
        held[weight] = run(config, tmp_path / f"held-{weight}")
        for name in (Q, DOWN):
            expected = by_hand(family, grams, name, base_gram=base_gram, base_weight=weight)
            torch.testing.assert_close(held[weight][name].double(), expected,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    base = weights_of(family["base"])
    for name in (Q, DOWN):
        distance = [float((m[name] - base[name]).norm()) for m in (plain, held[2.0], held[8.0])]
        assert distance[0] > distance[1] > distance[2] > 0
    torch.testing.assert_close(held[8.0][NORM], plain[NORM])  # not solved: averaged as before
    card = (tmp_path / "held-8.0" / "README.md").read_text()
    assert "The base joined the solve" in card and "weighted 8.0" in card
    assert "The base joined the solve" not in (tmp_path / "plain" / "README.md").read_text()


def test_base_scores_that_cannot_hold_the_base_are_refused_before_merging(
    family, grams, base_gram, tmp_path
):
    lacking = gram_file(family["base"], tmp_path / "lacking.safetensors", drop=(DOWN,))
    cases = {
        "a fine-tune's file": ({"base_scores": str(grams["ft_a"])}, "different checkpoint"),
        "no base_scores": ({"base_weight": 2.0}, "no base_scores is given"),
        "weight 0": ({"base_scores": str(base_gram), "base_weight": 0.0}, "must be positive"),
        "a layer missing": ({"base_scores": str(lacking)}, "no Gram matrix for linear weight"),
        "a per-entry score file": ({"base_scores": str(family["ft_a_scores"])},
                                   "base_scores.*needs a Gram file"),
    }
    for label, (parameters, message) in cases.items():
        out = tmp_path / label.replace(" ", "-")
        with pytest.raises(LrpError, match=message) as caught:
            run(regmean_config(family, grams, **parameters), out)
        assert not out.exists(), label
        if "base_scores" in parameters and message != "must be positive":
            assert "base_scores" in str(caught.value) or str(parameters["base_scores"]) in str(
                caught.value
            ), label


def test_the_merge_differs_from_task_arithmetic_and_from_lrp(family, grams, tmp_path):
    regmean = run(regmean_config(family, grams), tmp_path / "regmean")
    arithmetic = regmean_config(family, grams)
    arithmetic["merge_method"] = "task_arithmetic"
    for model in arithmetic["models"]:
        model["parameters"] = {"weight": 0.5}
    averaged = run(arithmetic, tmp_path / "task_arithmetic")
    lrp = run(lrp_config(family), tmp_path / "lrp")
    for other in (averaged, lrp):
        for name in (Q, DOWN):
            assert (regmean[name] - other[name]).abs().max() > 1e-4


def test_weights_that_share_an_input_share_one_factorization(family, grams, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """q/k/v (and gate/up) read one Gram matrix: it is factored once per merge."""
    calls = []
    real = gram_module.factorize

    def counted(summed, *args, **kwargs):
        calls.append(summed.shape[0])
        return real(summed, *args, **kwargs)

    monkeypatch.setattr(gram_module, "factorize", counted)
    forget_factors()
    run(regmean_config(family, grams), tmp_path / "out")
    stored = set(ScoreReader(grams["ft_a"]).metadata.gram_of.values())
    assert len(calls) == len(stored)  # 4 inputs per layer, 2 layers, lm_head: 9


def test_solve_dtype_float32_is_close_to_float64(family, grams, tmp_path):
    exact = run(regmean_config(family, grams), tmp_path / "f64")
    single = run(regmean_config(family, grams, solve_dtype="float32"), tmp_path / "f32")
    torch.testing.assert_close(single[DOWN], exact[DOWN], rtol=1e-3, atol=1e-5)


def test_mergekit_yaml_runs_regmean_and_the_card_says_so(family, grams, tmp_path):
    result = mergekit_yaml(regmean_config(family, grams), tmp_path / "out", "--random-seed", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "How the weights were chosen (`regmean`, mergekit-lrp)" in card
    assert "solved in closed form (RegMean)" in card and "alpha = 0.9" in card
    assert "solved in float64 (`solve_dtype: auto` on cpu)" in card  # the dtype used
    assert "ft_a-gram.safetensors" in card and "input_gram" in card
    saved = (tmp_path / "out" / "mergekit_config.yml").read_text()
    for parameter in ("alpha: 0.9", f"ridge: {DEFAULT_RIDGE:g}", "other_tensors: average"):
        assert parameter in saved
    merged = read_weights(tmp_path / "out")
    torch.testing.assert_close(merged[Q].double(), by_hand(family, grams, Q),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------ OBS saliency in lrp


def test_lrp_ranks_by_the_exact_obs_saliency_of_a_gram_file(family, grams, tmp_path):
    """One fine-tune, top-k at density 0.5: the kept entries are the top k of
    delta^2 / [(G + lambda I)^-1]_jj, not of the activation signal's delta^2 * G_jj."""
    config = lrp_config(
        family, importance="delta", per_model={"ft_a": {"lrp_scores": str(grams["ft_a"])}}
    )
    config["models"] = config["models"][:1]
    merged = run(config, tmp_path / "out")
    base, tuned = weights_of(family["base"]), weights_of(family["ft_a"])
    for name in (Q, DOWN):
        delta = tuned[name] - base[name]
        g = ScoreReader(grams["ft_a"]).gram(name).double()
        lam = OBS_RIDGE * float(g.diagonal().mean())
        inverse = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=torch.float64))
        obs = delta.square() * (1 / inverse.diagonal()).float()  # float32, as the merge
        k = round(0.5 * delta.numel())
        kept = merged[name] != base[name]
        assert torch.equal(kept, top_k_mask(obs, k))
        activation = top_k_mask(delta.square() * g.diagonal().float(), k)
        assert (kept != activation).sum() > 0.05 * delta.numel()


# ------------------------------------------------------------------ bad input


def refused(config, tmp_path, *fragments) -> str:
    out = tmp_path / "out"
    with pytest.raises(LrpError) as error:
        run(config, out)
    message = str(error.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    assert "\n" not in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def test_a_gram_file_of_another_checkpoint_is_refused(family, grams, tmp_path):
    config = regmean_config(family, grams, per_model={"ft_a": {"lrp_scores": str(grams["ft_b"])}})
    refused(config, tmp_path, "ft_b-gram.safetensors", family["ft_a"], "different checkpoint")


def test_a_gram_file_missing_a_layer(family, grams, tmp_path):
    path = gram_file(family["ft_a"], tmp_path / "partial.safetensors", drop=[DOWN])
    config = regmean_config(family, grams, per_model={"ft_a": {"lrp_scores": str(path)}})
    refused(config, tmp_path, "partial.safetensors", repr(DOWN), "missing_scores: other_tensors")
    config["parameters"]["missing_scores"] = "other_tensors"
    merged = run(config, tmp_path / "merged")
    a, b = weights_of(family["ft_a"]), weights_of(family["ft_b"])
    torch.testing.assert_close(merged[DOWN], (a[DOWN] + b[DOWN]) / 2)
    torch.testing.assert_close(merged[Q].double(), by_hand(family, grams, Q),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_gram_file_missing_a_layer_in_every_model(family, tmp_path):
    """No other model to compare with: the same module in the other layer gives it away."""
    files = {
        n: gram_file(family[n], tmp_path / f"{n}.safetensors", drop=[DOWN])
        for n in ("ft_a", "ft_b")
    }
    refused(regmean_config(family, files), tmp_path, repr(DOWN), "no Gram matrix")


def test_a_per_parameter_score_file_given_to_regmean(family, grams, tmp_path):
    config = regmean_config(
        family, grams, per_model={"ft_b": {"lrp_scores": str(family["ft_b_scores"])}}
    )
    refused(config, tmp_path, "ft_b.safetensors", "mean_abs_grad", "needs a Gram file")


def test_regmean_without_a_gram_file(family, grams, tmp_path):
    config = regmean_config(family, grams)
    del config["models"][0]["parameters"]["lrp_scores"]
    refused(config, tmp_path, family["ft_a"], "has no lrp_scores", "--method gram")


@pytest.mark.parametrize(
    "method, parameters, fragments",
    [
        ("circuit", {"drop_order": "scores"}, ("is a Gram file", "circuit")),
        ("lrp", {"importance": "scores"}, ("is a Gram file", "importance: delta or weight")),
        ("lrp", {"budget": "layer"}, ("budget: layer", "is a Gram file")),
    ],
)
def test_a_gram_file_given_where_per_entry_scores_are_read(
    family, grams, tmp_path, method, parameters, fragments
):
    config = lrp_config(family, **parameters)
    config["models"][0]["parameters"]["lrp_scores"] = str(grams["ft_a"])
    if method == "circuit":
        config["merge_method"] = "circuit"
        config["parameters"] = parameters
        for model in config["models"]:
            del model["parameters"]["weight"]
    refused(config, tmp_path, "ft_a-gram.safetensors", *fragments)


def test_a_singular_gram_matrix_is_found_at_solve_time(family, grams, tmp_path):
    """Rank 1 (one token's outer product), alpha 1 and no ridge: nothing to solve."""
    x = torch.randn(32, generator=torch.Generator().manual_seed(0))
    stored = ScoreReader(grams["ft_a"]).gram_name(Q)
    paths = {}
    for n in ("ft_a", "ft_b"):
        paths[n] = gram_file(family[n], tmp_path / f"{n}-rank1.safetensors",
                             tensors={stored: torch.outer(x, x)})  # fmt: skip
    config = regmean_config(family, paths, alpha=1.0, ridge=0.0)
    refused(config, tmp_path, "singular or too ill-conditioned", "self_attn",
            "rank1.safetensors", "raise ridge")  # fmt: skip
    run({**config, "parameters": {"alpha": 0.9, "ridge": 0.0}}, tmp_path / "fine")


def test_a_non_finite_gram_matrix_is_found_at_solve_time(family, grams, tmp_path):
    stored = ScoreReader(grams["ft_a"]).gram_name(DOWN)
    bad = ScoreReader(grams["ft_a"]).gram(DOWN)
    bad[3, 5] = float("nan")
    path = gram_file(family["ft_a"], tmp_path / "nan.safetensors", tensors={stored: bad})
    config = regmean_config(family, grams, per_model={"ft_a": {"lrp_scores": str(path)}})
    refused(config, tmp_path, "nan.safetensors", repr(DOWN), "NaN or Inf")


def test_a_gram_matrix_of_the_wrong_shape(family, grams, tmp_path):
    stored = ScoreReader(grams["ft_a"]).gram_name(DOWN)
    path = gram_file(family["ft_a"], tmp_path / "shape.safetensors",
                     tensors={stored: torch.eye(32)})  # fmt: skip
    config = regmean_config(family, grams, per_model={"ft_a": {"lrp_scores": str(path)}})
    refused(config, tmp_path, "shape.safetensors", repr(DOWN), "(32, 32)", "64 input features")


@pytest.mark.parametrize(
    "parameters, per_model, fragment",
    [
        ({"alpha": 1.5}, {}, "alpha must be in [0, 1]"),
        ({"ridge": -1.0}, {}, "ridge must be >= 0"),
        ({"other_tensors": "ties"}, {}, "other_tensors must be one of average, task_arithmetic"),
        ({"solve_dtype": "float16"}, {}, "solve_dtype must be one of auto, float64, float32"),
        ({"missing_scores": "magnitude"}, {}, "missing_scores must be one of error"),
        ({}, {"ft_b": {"weight": 0.0}}, "weight for"),
        ({"alpah": 0.5}, {}, "did you mean 'alpha'"),
        ({}, {"ft_a": {"density": 0.5}}, "unknown parameter 'density'"),
    ],
)
def test_bad_regmean_parameters(family, grams, tmp_path, parameters, per_model, fragment):
    refused(regmean_config(family, grams, per_model=per_model, **parameters), tmp_path, fragment)


def test_a_bad_input_is_one_line_under_mergekit_yaml(family, grams, tmp_path):
    config = regmean_config(family, grams, per_model={"ft_a": {"lrp_scores": str(grams["ft_b"])}})
    result = mergekit_yaml(config, tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "different checkpoint" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_merge_mask_takes_per_entry_scores_not_a_gram_matrix():
    from mergekit_lrp import merge_mask

    with pytest.raises(LrpError, match="Gram matrix per layer input"):
        merge_mask(torch.zeros(2, 2), torch.ones(2, 2), torch.eye(2), quantity="input_gram")
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    kept = merge_mask(torch.zeros(2, 2), torch.ones(2, 2), scores, 0.5, selection="topk")
    assert kept.tolist() == [[False, False], [True, True]]


def test_too_few_calibration_tokens_without_a_ridge_is_said_or_refused(family, tmp_path):
    from mergekit_lrp.merging.methods import regmean as regmean_module

    regmean_module._WARNED.clear()
    few = {  # 12 tokens each: 24 in all, fewer than the 32 features q/k/v and gate/up read
        name: gram_file(family[name], tmp_path / f"{name}-few.safetensors", sequences=[seq])
        for name, seq in (("ft_a", SEQUENCES[0]), ("ft_b", SEQUENCES[1]))
    }
    with pytest.warns(UserWarning, match=r"regmean: model\.layers\.0\..* 24 calibration tokens "
                      r"in all, fewer than its 32 input features.*ridge 0 and alpha 0\.9"):
        run(regmean_config(family, few, ridge=0.0), tmp_path / "warned")
    refused(regmean_config(family, few, ridge=0.0, alpha=1.0), tmp_path,
            "24 calibration tokens", "alpha 1 adds no diagonal", "Set ridge")  # fmt: skip
