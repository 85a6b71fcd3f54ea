"""One spec per merge method: what used to drift between the kernel, the pre-merge check,
the inspector and process-wide caches now comes from one place."""

import pytest
import torch
from checkpoints import synthetic_scores
from helpers import lrp_config
from merge_runner import mergekit_yaml, read_weights, run
from safetensors.torch import load_file

from mergekit_lrp.merging.masks import MaskSettings, kept_mask
from mergekit_lrp.merging.methods import METHODS, spec_of
from mergekit_lrp.merging.tensor_scores import TensorScores, open_scores

UP = "model.layers.0.mlp.up_proj.weight"


def test_every_method_module_is_a_whole_spec():
    for name, spec in METHODS.items():
        module = spec_of(name)
        assert module.NAME == name
        registered = spec.registered()
        assert registered.spec.name == name
        for part in ("settings_of", "reads_files", "check_model", "check_tensor", "describe"):
            assert callable(getattr(module, part)), (name, part)
        # the kernel's signature defaults are the settings class's
        settings = module.DEFAULTS
        defaults = {p.name: p.default for p in registered.spec.parameters if not p.required}
        for field, value in vars(settings).items():
            assert defaults[field] == value, (name, field)


def test_a_bad_unit_mass_is_refused_before_the_first_tensor(family, tmp_path):
    """The pre-merge check reads the same settings class as the kernel (it did not check
    unit_mass, so the merge failed only at its first tensor)."""
    config = lrp_config(family, consensus="unit", unit_mass="rows")
    out = tmp_path / "out"
    result = mergekit_yaml(config, out)
    assert result.returncode != 0
    assert "lrp: unit_mass must be one of importance, magnitude; got 'rows'" in result.stderr
    assert "Executing graph" not in result.stderr  # refused before merging began
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yml"]


def test_inspectors_mask_is_the_applied_one_under_a_layer_budget_and_missing_scores(
    family, tmp_path
):
    """One fine-tune at weight 1 with top-k: the merged weights differ from the base
    exactly where the merge kept the change; lrp-inspect's mask (the API's kernel copy)
    must be that mask, with the layer budget's densities and a tensor the score file
    lacks left to the base."""
    partial = synthetic_scores(family["ft_a"], tmp_path / "partial.safetensors", seed=7,
                               drop=[UP])  # fmt: skip
    config = lrp_config(family, budget="layer", missing_scores="base", density=0.3,
                        per_model={"ft_a": {"lrp_scores": str(partial)}})  # fmt: skip
    config["models"] = config["models"][:1]
    merged = run(config, tmp_path / "out")
    base = read_weights(family["base"])
    tuned = read_weights(family["ft_a"])
    settings = MaskSettings(density=0.3, selection="topk", budget="layer",
                            missing_scores="base")  # fmt: skip
    reader = open_scores(str(partial))
    compared = 0
    for name in load_file(partial):
        delta = tuned[name] - base[name]
        if delta.ndim < 2 or "embed" in name or "lm_head" in name:
            continue
        located = TensorScores(str(family["ft_a"]), name, reader)
        mask = kept_mask(located, tuned[name], delta, settings, str(family["ft_a"]))
        applied = (merged[name] != base[name]) | (delta == 0) & mask
        assert torch.equal(mask, applied), name
        compared += 1
    assert compared >= 6
    # the tensor without scores contributes nothing, in the merge and in the mask
    assert torch.equal(merged[UP], base[UP])
    missing = TensorScores(str(family["ft_a"]), UP, reader, "base", fallback="base")
    assert not kept_mask(missing, tuned[UP], tuned[UP] - base[UP], settings).any()


def test_a_score_file_rewritten_in_one_process_gives_the_new_budget(family, tmp_path):
    """The layer budget's shares follow the file's current content: score mass moved
    from one tensor of layer 0 to another moves the kept entries with it."""
    path = tmp_path / "scores.safetensors"
    config = lrp_config(family, budget="layer", density=0.3,
                        per_model={"ft_a": {"lrp_scores": str(path)}})  # fmt: skip
    config["models"] = config["models"][:1]
    q = "model.layers.0.self_attn.q_proj.weight"

    def kept_in(merged) -> int:
        base = read_weights(family["base"])
        return int((merged[q] != base[q]).sum())

    values = torch.rand((32, 32), generator=torch.Generator().manual_seed(0)) + 0.5
    low = {q: values * 1e-3}
    synthetic_scores(family["ft_a"], path, seed=3, tensors=low)
    first = kept_in(run(config, tmp_path / "first"))
    high = {q: values * 10}
    synthetic_scores(family["ft_a"], path, seed=3, tensors=high)
    second = kept_in(run(config, tmp_path / "second"))
    assert second > first, (first, second)
    fresh = kept_in(run(config, tmp_path / "third"))
    assert fresh == second


@pytest.mark.parametrize(
    "method, words",
    [("lrp", "task vector"), ("circuit", "priority order"), ("regmean", "(RegMean)")],
)
def test_a_method_card_text_comes_from_its_spec(method, words):
    from mergekit_lrp.merging.model_card import CardFacts
    from mergekit_lrp.merging.provenance import Provenance

    module = spec_of(method)
    provenance = Provenance(method, 0, False, {}, dict(vars(module.DEFAULTS)), [])

    class Config:
        parameters = None
        models = ()
        slices = None
        modules = None

    text = module.describe(CardFacts(Config(), provenance), provenance.parameters)
    assert words in text


def test_nothing_a_merge_cached_outlives_it(family, tmp_path):
    """Budget shares, open score files and Gram factorizations are dropped at the end of
    every merge through the run guard (a later merge reads its files afresh)."""
    from mergekit_lrp.merging import budgets, gram_solve, tensor_scores

    config = lrp_config(family, budget="layer")
    run(config, tmp_path / "out")
    assert budgets._densities.cache_info().currsize == 0
    assert tensor_scores._open_scores.cache_info().currsize == 0
    assert not gram_solve.LAYER_FACTORS.entries and not gram_solve._OBS_FACTORS


@pytest.mark.parametrize(
    "method, parameter, owners",
    [("regmean", "density", "lrp"), ("regmean", "consensus", "lrp"), ("lrp", "alpha", "regmean"),
     ("lrp", "temperature", "circuit")],
)  # fmt: skip
def test_a_parameter_of_another_method_names_the_method_it_belongs_to(
    family, tmp_path, method, parameter, owners
):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_lrp.merging.parameters import LRPConfigError
    from mergekit_lrp.merging.preflight import check_merge

    config = lrp_config(family)
    config["merge_method"] = method
    config["parameters"] = {parameter: 0.5}
    with pytest.raises(LRPConfigError) as error:
        check_merge(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    message = str(error.value)
    assert message.startswith(f"{method}: unknown parameter {parameter!r}")
    assert f"it is a parameter of {owners}, not {method}" in message
