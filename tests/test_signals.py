"""Importance signals besides AttnLRP (gradient, Fisher, activation): each against a hand
computation, each usable by the lrp merge, mixed per tensor family through filters."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import char_tokenizer
from helpers import lrp_config
from merge_runner import read_weights, run
from safetensors.torch import load_file
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

PROMPTS = ["the cat sat on the mat", "sort 3 1 2 -> 1 2 3"]
BIN = Path(sys.executable).parent


def scores_of(method: str, model=None, **options):
    model = model or make_tiny_model("llama", seed=3, **AS_CHECKPOINT)
    options = ComputeOptions(method=method, progress=False, **options)
    return model, relevance_scores(model, char_tokenizer(), PROMPTS, options)


def ids_of(prompt: str) -> torch.Tensor:
    return torch.tensor([char_tokenizer()(prompt)["input_ids"]])


def test_gradient_is_the_plain_gradient_of_the_same_target():
    model, scores = scores_of("gradient")
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for prompt in PROMPTS:
        model.zero_grad()
        model(ids_of(prompt)).logits[0, -1].max().backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.abs() / len(PROMPTS)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-7)


def test_fisher_is_the_squared_gradient_of_the_next_tokens_log_likelihood():
    model, scores = scores_of("fisher")
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for prompt in PROMPTS:
        model.zero_grad()
        ids = ids_of(prompt)
        log_probs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
        log_probs.gather(1, ids[0, 1:, None]).sum().backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.square() / len(PROMPTS)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-9)


def test_activation_is_the_mean_summed_square_of_each_input_column():
    model, scores = scores_of("activation")
    layer = model.model.layers[1].self_attn.q_proj
    captured, counts = [], torch.zeros(model.config.vocab_size)
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = ids_of(prompt)
            counts += torch.bincount(ids[0], minlength=counts.numel()).float()
            model(ids)
    handle.remove()
    column = sum((x[0] ** 2).sum(dim=0) for x in captured) / len(PROMPTS)
    q = scores["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(q, column.expand_as(q), rtol=1e-5, atol=1e-7)
    embed = scores["model.embed_tokens.weight"]
    torch.testing.assert_close(embed[:, 0], counts / len(PROMPTS))
    assert "model.norm.weight" not in scores  # no linear input: no scores


def test_activation_needs_linear_layers():
    from mergekit_lrp.scoring.activation import ActivationAccumulator

    net = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ComputeError, match="--method activation.*nn.Linear"):
        ActivationAccumulator(net, dict(net.named_parameters()))


def test_unknown_method_is_refused():
    with pytest.raises(ComputeError, match="--method must be one of attnlrp, gradient"):
        ComputeOptions(method="hessian")


@pytest.fixture(scope="module")
def signal_files(family, tmp_path_factory):
    """Score files of ft_a and ft_b written by lrp-compute with every method."""
    root = tmp_path_factory.mktemp("signals")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    files = {}
    for method in ("attnlrp", "gradient", "fisher", "activation"):
        for name in ("ft_a", "ft_b"):
            out = root / f"{name}-{method}.safetensors"
            options = ComputeOptions(method=method, progress=False)
            compute_scores(str(family[name]), str(prompts), str(out), options)
            files[name, method] = out
    return files


def test_each_file_records_its_quantity_and_differs(signal_files):
    quantities = {
        method: ScoreReader(signal_files["ft_a", method]).metadata.quantity
        for method in ("attnlrp", "gradient", "fisher", "activation")
    }
    assert quantities == {
        "attnlrp": "mean_abs_grad",
        "gradient": "mean_abs_grad",
        "fisher": "mean_sq_grad",
        "activation": "mean_sq_input",
    }
    attnlrp = load_file(signal_files["ft_a", "attnlrp"])
    gradient = load_file(signal_files["ft_a", "gradient"])
    name = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(attnlrp[name], gradient[name])  # the rules change the scores


def with_files(family, signal_files, method, **parameters):
    per_model = {n: {"lrp_scores": str(signal_files[n, method])} for n in ("ft_a", "ft_b")}
    return lrp_config(family, per_model=per_model, **parameters)


def test_a_merge_from_each_kind_of_file_differs_from_the_magnitude_merge(
    family, signal_files, tmp_path
):
    magnitude = lrp_config(family, missing_scores="magnitude")
    for model in magnitude["models"]:
        del model["parameters"]["lrp_scores"]
    reference = run(magnitude, tmp_path / "magnitude")
    name = "model.layers.1.mlp.down_proj.weight"
    merged = {}
    for method in ("attnlrp", "gradient", "fisher", "activation"):
        merged[method] = run(with_files(family, signal_files, method), tmp_path / method)[name]
        assert not torch.equal(merged[method], reference[name]), method
    assert not torch.equal(merged["fisher"], merged["attnlrp"])


def test_a_mode_the_quantity_cannot_serve_is_refused(family, signal_files, tmp_path):
    config = with_files(family, signal_files, "activation", importance="scores")
    with pytest.raises(LRPConfigError, match="importance: scores.*activation.safetensors"):
        run(config, tmp_path / "out")
    run(with_files(family, signal_files, "fisher", importance="scores"), tmp_path / "ok")


def test_a_quantity_this_version_does_not_know_is_refused(signal_files, tmp_path):
    import json
    import struct

    data = signal_files["ft_a", "fisher"].read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"]["quantity"] = "hessian_diag"
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    text += b" " * (size - len(text))  # same length: the data offsets stay valid
    path = tmp_path / "future.safetensors"
    path.write_bytes(data[:8] + text + data[8 + size :])
    with pytest.raises(ScoreFileError, match="'hessian_diag'.*upgrade mergekit-lrp"):
        ScoreReader(path)


def test_signals_mixed_per_tensor_family_through_filters(family, signal_files, tmp_path):
    """Fisher for self_attn, AttnLRP elsewhere, with mergekit's own filter syntax."""
    mixed = lrp_config(family)
    for model, name in zip(mixed["models"], ("ft_a", "ft_b"), strict=True):
        model["parameters"]["lrp_scores"] = [
            {"filter": "self_attn", "value": str(signal_files[name, "fisher"])},
            {"value": str(signal_files[name, "attnlrp"])},
        ]
    config = tmp_path / "mixed.yml"
    config.write_text(yaml.safe_dump(mixed))
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(config), str(tmp_path / "mixed")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = read_weights(tmp_path / "mixed")
    fisher = run(with_files(family, signal_files, "fisher"), tmp_path / "fisher")
    attnlrp = run(with_files(family, signal_files, "attnlrp"), tmp_path / "attnlrp")
    attention, mlp = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[attention], fisher[attention])
    assert torch.equal(merged[mlp], attnlrp[mlp])
    assert not torch.equal(fisher[attention], attnlrp[attention])
