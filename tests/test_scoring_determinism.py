"""Score files are reproducible: padding adds nothing, reruns and resumes give the same bytes."""


import pytest
import torch
from helpers import interrupted_at_pass
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
from mergekit_lrp.scoring.run import compute_scores

QUIET = {"progress": False}


@pytest.mark.parametrize("target", ["predicted", "next-token"])
def test_padding_never_contributes(target):
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    model = make_tiny_model("llama", seed=5, **AS_CHECKPOINT)
    ids = torch.tensor([7, 11, 13, 17, 19, 23])
    padded = torch.cat([torch.zeros(3, dtype=torch.long), ids])
    mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones_like(ids)])
    grads = []
    with attnlrp_rules(model), backward_ready(model):
        for tokens, attention in ((ids, torch.ones_like(ids)), (padded, mask)):
            result = relevance_pass(model, tokens, attention, target)
            grads.append((result, {n: p.grad.clone() for n, p in model.named_parameters()}))
            model.zero_grad(set_to_none=True)
    (alone, g_alone), (pad, g_pad) = grads
    assert alone.tokens == pad.tokens == 6
    assert alone.target == pytest.approx(pad.target, rel=1e-5)
    for name in g_alone:
        torch.testing.assert_close(g_alone[name], g_pad[name], rtol=1e-4, atol=1e-6)


def test_files_are_byte_identical_across_runs(llama_dir, prompts_file, tmp_path):
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    for out in outs:
        compute_scores(str(llama_dir), str(prompts_file), str(out), ComputeOptions(**QUIET))
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_resume_after_interruption_gives_the_same_file(llama_dir, prompts_file, tmp_path):
    options = ComputeOptions(checkpoint_every=2, **QUIET)
    reference = tmp_path / "reference.safetensors"
    compute_scores(str(llama_dir), str(prompts_file), str(reference), options)

    out = tmp_path / "scores.safetensors"
    with interrupted_at_pass(4):
        compute_scores(str(llama_dir), str(prompts_file), str(out), options)
    assert not out.exists() and (tmp_path / "scores.safetensors.resume").exists()

    with pytest.raises(ValueError, match="--resume"):
        compute_scores(str(llama_dir), str(prompts_file), str(out), options)
    other = ComputeOptions(checkpoint_every=2, resume=True, max_length=16, **QUIET)
    with pytest.raises(ValueError, match="max_length"):
        compute_scores(str(llama_dir), str(prompts_file), str(out), other)

    resumed = ComputeOptions(checkpoint_every=2, resume=True, **QUIET)
    summary = compute_scores(str(llama_dir), str(prompts_file), str(out), resumed)
    assert summary.resumed_from == 2
    assert out.read_bytes() == reference.read_bytes()
    assert not (tmp_path / "scores.safetensors.resume").exists()


def test_resume_with_another_model_is_refused(family, long_prompts_file, tmp_path):
    out = tmp_path / "s.safetensors"
    with interrupted_at_pass(3):
        compute_scores(
            str(family["ft_a"]),
            str(long_prompts_file),
            str(out),
            ComputeOptions(checkpoint_every=1, progress=False),
        )
    with pytest.raises(ValueError, match="model_fingerprint"):
        compute_scores(
            str(family["ft_b"]),
            str(long_prompts_file),
            str(out),
            ComputeOptions(checkpoint_every=1, resume=True, progress=False),
        )
    assert not out.exists()
