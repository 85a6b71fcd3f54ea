"""``lrp`` with ``base_scores``: each entry's merged change shrunk by A / (A + w b), A the
fine-tunes' kept importance there and b the base's own, checked by hand through a real
merge; and the base's file refused before merging when it cannot serve."""

from __future__ import annotations

import pytest
import torch
from checkpoints import synthetic_scores
from gram_files import gram_file
from helpers import lrp_config
from merge_runner import run
from safetensors.torch import load_file

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.methods.lrp import held_share
from mergekit_lrp.merging.selection import top_k_mask

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def base_scores(family, tmp_path_factory):
    return synthetic_scores(family["base"], tmp_path_factory.mktemp("b") / "base.safetensors", 30)


def weights(path):
    return load_file(path / "model.safetensors")


def test_held_share_is_one_where_nothing_was_kept_and_falls_with_the_weight():
    kept = torch.tensor([0.0, 1.0, 1.0, 3.0])
    base = torch.tensor([5.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(held_share(kept, base, 1.0), torch.tensor([1.0, 1.0, 0.5, 0.75]))
    assert bool((held_share(kept, base, 4.0) <= held_share(kept, base, 1.0)).all())


def test_the_merged_change_is_shrunk_where_the_base_relies_on_an_entry(
    family, base_scores, tmp_path
):
    plain = run(lrp_config(family), tmp_path / "plain")
    held = run(lrp_config(family, base_scores=str(base_scores), base_weight=2.0),
               tmp_path / "held")  # fmt: skip
    base = weights(family["base"])
    base_s = load_file(base_scores)
    for name in (Q, DOWN):
        kept = torch.zeros_like(base[name])
        for model in ("ft_a", "ft_b"):
            theta = weights(family[model])[name]
            imp = theta.abs() * load_file(family[f"{model}_scores"])[name]
            mask = top_k_mask(imp, imp.numel() // 2)
            kept += imp * mask / imp.mean()
        b = base[name].abs() * base_s[name]
        share = held_share(kept, b / b.mean(), 2.0)
        expected = (plain[name] - base[name]) * share
        torch.testing.assert_close(held[name] - base[name], expected, rtol=1e-5, atol=1e-7)
        assert float(share.min()) < 0.5 < float(share.max())  # the rule bites, unevenly
    torch.testing.assert_close(held[NORM], plain[NORM])  # kept whole: no scores read


def test_a_base_file_that_cannot_serve_is_refused_before_merging(family, base_scores, tmp_path):
    cases = {
        "a fine-tune's file": ({"base_scores": str(family["ft_a_scores"])}, "different checkpoint"),
        "no base_scores": ({"base_weight": 3.0}, "no base_scores is given"),
        "weight -1": ({"base_scores": str(base_scores), "base_weight": -1.0}, "must be positive"),
    }
    for label, (parameters, message) in cases.items():
        out = tmp_path / label.replace(" ", "-")
        with pytest.raises(LrpError, match=message):
            run(lrp_config(family, **parameters), out)
        assert not out.exists(), label


def test_a_gram_file_of_the_base_cannot_rank_by_scores_alone(family, tmp_path):
    """importance: scores reads the base's scores alone, which a Gram file does not hold
    per entry: refused naming the base's file."""
    gram = gram_file(family["base"], tmp_path / "base-gram.safetensors")
    config = lrp_config(family, base_scores=str(gram), importance="scores")
    with pytest.raises(LrpError, match="base-gram.safetensors.*Gram file") as caught:
        run(config, tmp_path / "out")
    assert "base_scores" in str(caught.value)
    assert not (tmp_path / "out").exists()
