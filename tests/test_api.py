"""The notebook API: each docstring example runs as written, and the mask it builds is
the one the merge applies."""

import doctest
import os
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoints import char_tokenizer
from merge_runner import run
from safetensors.torch import load_file
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp import api


def run_example(function, **globs) -> None:
    """Run ``function``'s docstring example as a doctest with ``globs`` defined."""
    (test,) = doctest.DocTestFinder().find(function, globs=dict(globs))
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, function.__name__


def test_import_is_cheap_and_api_names_load_lazily():
    code = (
        "import sys, mergekit_lrp; assert 'torch' not in sys.modules, 'eager torch'; "
        "f = mergekit_lrp.merge_mask; assert 'torch' in sys.modules; "
        "assert f is __import__('mergekit_lrp.api').api.merge_mask; "
        "assert {'compute_scores', 'read_scores', 'merge_mask'} <= set(dir(mergekit_lrp))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_compute_scores_example():
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    run_example(api.compute_scores, model=model, tokenizer=char_tokenizer())
    scores = api.compute_scores(model, char_tokenizer(), ["2 + 2 = 4"])
    assert set(scores) == {name for name, _ in model.named_parameters()}
    assert all(bool((s >= 0).all()) for s in scores.values())


def test_read_scores_example(family, tmp_path, monkeypatch):
    (tmp_path / "scores").mkdir()
    shutil.copy(family["ft_a_scores"], tmp_path / "scores" / "ft-math.safetensors")
    monkeypatch.chdir(tmp_path)
    run_example(api.read_scores)


def test_merge_mask_example():
    run_example(api.merge_mask)


@pytest.mark.parametrize("selection", ["topk", "stochastic"])
def test_merge_mask_is_the_mask_the_merge_applies(family, tmp_path, selection):
    """ft_a listed second (ft_b first, weight 0), kept deltas added: the merge changes the
    base exactly where merge_mask (for ft_a, the merge's seed) keeps ft_a's entries."""
    name = "model.layers.1.self_attn.o_proj.weight"
    models = []
    for ft, weight in (("ft_b", 0.0), ("ft_a", 1.0)):
        parameters = {"weight": weight, "lrp_scores": str(family[f"{ft}_scores"])}
        models.append({"model": str(family[ft]), "parameters": parameters})
    rule = {"selection": selection, "consensus": "none", "normalize": False}
    config = {
        "merge_method": "lrp",
        "base_model": str(family["base"]),
        "models": models,
        "parameters": {"density": 0.25, **rule},
        "dtype": "float32",
    }
    merged = run(config, tmp_path / "out", random_seed=7)[name]
    theta_base = load_file(family["base"] / "model.safetensors")[name]
    theta = load_file(family["ft_a"] / "model.safetensors")[name]
    scores = api.read_scores(family["ft_a_scores"]).get(name)
    mask = api.merge_mask(
        theta_base,
        theta,
        scores,
        0.25,
        selection=selection,
        seed=7,
        model=str(family["ft_a"]),
        name=name,
    )
    assert torch.equal(merged != theta_base, mask)
    if selection == "topk":
        assert int(mask.sum()) == round(0.25 * mask.numel())
        torch.testing.assert_close(merged, theta_base + (theta - theta_base) * mask)
    else:  # another seed or another model draws another mask
        other = dict(selection=selection, name=name)
        assert not torch.equal(
            mask,
            api.merge_mask(
                theta_base, theta, scores, 0.25, seed=8, model=str(family["ft_a"]), **other
            ),
        )
        assert not torch.equal(
            mask,
            api.merge_mask(
                theta_base, theta, scores, 0.25, seed=7, model=str(family["ft_b"]), **other
            ),
        )
    assert api.merge_mask(theta_base, theta, scores, 0.25, name="lm_head.weight").all()
    norm = torch.ones(4)
    assert api.merge_mask(norm, norm + 1, None, 0.25).all()  # 1-D: protected
    assert not api.merge_mask(norm, norm + 1, None, 0.25, protect_special=False).all()
