"""The merged model's README: named after the output, saying how it was merged."""

from helpers import lrp_config
from merge_runner import run


def test_model_card_names_the_output_the_method_and_the_score_files(family, tmp_path):
    run(lrp_config(family), tmp_path / "my-merge")
    card = (tmp_path / "my-merge" / "README.md").read_text()
    assert card.lstrip().startswith("---") or "# my-merge" in card
    assert "partial" not in card
    assert "Merged with `lrp` (mergekit-lrp)" in card
    assert "ft_a.safetensors" in card and "ft_b.safetensors" in card
    assert "mean_abs_grad" in card
