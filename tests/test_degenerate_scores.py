"""Scores that would make a merge arbitrary are caught by lrp-compute, not written silently."""

from pathlib import Path

import pytest
import torch
from checkpoints import save
from click.testing import CliRunner
from tiny_models import AS_CHECKPOINT, make_tiny_model
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring.cli import main as cli
from mergekit_lrp.scoring.options import ComputeError
from mergekit_lrp.scoring.writing import check_scores


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("the cat sat on the mat\nsort 3 1 2 gives 1 2 3\n")
    return path


def test_model_whose_output_ignores_its_input_writes_no_file(tmp_path, prompts):
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()  # every hidden state is 0, whatever the input
    model_dir = save(model, tmp_path / "flat")
    out = tmp_path / "scores.safetensors"
    result = invoke(model_dir, "--prompts", prompts, "-o", out, "-q")
    assert result.exit_code != 0
    assert "zero everywhere" in result.output and "not written" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".scores*"))


def test_tokenizer_that_maps_every_prompt_to_one_token_is_refused(tmp_path, prompts):
    model_dir = save(make_tiny_model("llama", seed=0, **AS_CHECKPOINT), tmp_path / "model")
    # a word-level vocabulary of one unknown token and no pre-tokenizer: one token a prompt
    one_token = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={"<unk>": 3}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    one_token.save_pretrained(model_dir)
    out = tmp_path / "scores.safetensors"
    result = invoke(model_dir, "--prompts", prompts, "-o", out, "-q")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"every prompt of {prompts} is one token" in result.output, result.output
    assert "Loading weights" not in result.output  # refused before the model is loaded
    assert not out.exists()


def test_check_scores_refuses_non_finite_and_leaves_unreached_tensors_out(tmp_path):
    out = tmp_path / "x.safetensors"
    good = {"a.weight": torch.rand(3, 3), "router.weight": torch.zeros(4, 3)}
    assert check_scores(good, {"a.weight"}, out) == ["router.weight"]  # no gradient reached
    with pytest.raises(ComputeError, match="'a.weight' are not finite"):
        check_scores({**good, "a.weight": torch.tensor([[float("nan")]])}, {"a.weight"}, out)
    with pytest.raises(ComputeError, match="zero everywhere .*router.weight"):
        check_scores(good, {"a.weight", "router.weight"}, out)  # reached, yet all zero


def test_score_file_says_what_it_was_computed_from(tmp_path, prompts):
    model_dir = save(make_tiny_model("llama", seed=0, **AS_CHECKPOINT), tmp_path / "model")
    out = tmp_path / "scores" / "model.safetensors"  # the folder is created
    result = invoke(model_dir, "--prompts", prompts, "-o", out, "-q", "--target", "next-token")
    assert result.exit_code == 0, result.output
    meta = ScoreReader(out).metadata
    assert meta.extra["model"] == str(model_dir)
    assert meta.extra["prompts"] == str(prompts)
    assert meta.extra["revision"] == ""
    assert meta.target == "next-token"
