"""lrp-compute: coverage, behaviour of the model afterwards, padding, determinism, resume."""

import json
from pathlib import Path

import pytest
import torch
from checkpoints import char_tokenizer, save, tiny_llama
from helpers import invoke
from safetensors import safe_open
from tiny_models import make_tiny_model

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files, model_fingerprint
from mergekit_lrp.scoring import loop as compute_module
from mergekit_lrp.scoring.attnlrp import SUPPORTED_MODEL_TYPES
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
from mergekit_lrp.scoring.run import compute_scores

PROMPTS = ["12+34=46", "reverse: abc -> cba", "the cat sat on the mat", "key k7 -> v3"]
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save(tiny_llama(seed=3), tmp_path_factory.mktemp("llama") / "model")


def tensor_shapes(model_dir: Path) -> dict[str, tuple]:
    shapes = {}
    for name, file in checkpoint_tensor_files(model_dir).items():
        with safe_open(file, framework="pt") as handle:
            shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_MODEL_TYPES if t != "gemma3"])
def test_every_architecture_covers_every_checkpoint_tensor(model_type, tmp_path, prompts_file):
    model_dir = save(make_tiny_model(model_type, vocab_size=104), tmp_path / model_type)
    out = tmp_path / "scores.safetensors"
    summary = compute_scores(str(model_dir), str(prompts_file), str(out), ComputeOptions(**QUIET))
    reader = ScoreReader(out)
    assert reader.metadata.model_fingerprint == model_fingerprint(model_dir)
    assert reader.metadata.num_prompts == len(PROMPTS)
    for name, shape in tensor_shapes(model_dir).items():
        assert reader.resolve(name) is not None, name
        scores = reader.get(name, shape=shape)
        assert scores.sum() > 0, name
    assert summary.conservation == summary.conservation, summary.lines()  # finite, not NaN


def test_tied_embeddings_get_one_score_tensor(tmp_path, prompts_file):
    model_dir = save(tiny_llama(seed=1, tie=True), tmp_path / "tied")
    assert "lm_head.weight" not in checkpoint_tensor_files(model_dir)
    out = tmp_path / "tied.safetensors"
    compute_scores(str(model_dir), str(prompts_file), str(out), ComputeOptions(**QUIET))
    reader = ScoreReader(out)
    assert "lm_head.weight" not in reader.names()
    assert reader.resolve("lm_head.weight") == "model.embed_tokens.weight"


def test_model_behaves_as_before_after_scoring():
    model = tiny_llama(seed=4)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    ids = torch.tensor([[5, 9, 14, 22, 30]])
    before = model(ids).logits
    scores = relevance_scores(model, char_tokenizer(), PROMPTS)
    after = model(ids).logits
    assert torch.equal(before, after)
    assert not model.training and not model.is_activation_checkpointing
    assert model.config.use_cache is True
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(s).all() and s.sum() > 0 for s in scores.values())


@pytest.mark.parametrize("target", ["predicted", "next-token"])
def test_padding_never_contributes(target):
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules
    from mergekit_lrp.scoring.relevance import backward_ready

    model = tiny_llama(seed=5)
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


def test_resume_after_interruption_gives_the_same_file(
    llama_dir, prompts_file, tmp_path, monkeypatch
):
    options = ComputeOptions(checkpoint_every=2, **QUIET)
    reference = tmp_path / "reference.safetensors"
    compute_scores(str(llama_dir), str(prompts_file), str(reference), options)

    real_pass, calls = compute_module.relevance_pass, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_pass(*args, **kwargs)

    out = tmp_path / "scores.safetensors"
    monkeypatch.setattr(compute_module, "relevance_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_scores(str(llama_dir), str(prompts_file), str(out), options)
    monkeypatch.undo()
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


def test_merge_accepts_computed_scores_and_masks_differ_from_magnitude(
    family, tmp_path, prompts_file
):
    from helpers import lrp_config
    from merging import run
    from safetensors.torch import load_file

    from mergekit_lrp.merging.selection import top_k_mask

    scores = {}
    for name in ("ft_a", "ft_b"):
        scores[name] = tmp_path / f"{name}.safetensors"
        compute_scores(
            str(family[name]), str(prompts_file), str(scores[name]), ComputeOptions(**QUIET)
        )
    config = lrp_config(family, per_model={n: {"lrp_scores": str(p)} for n, p in scores.items()})
    merged = run(config, tmp_path / "merged")
    assert all(torch.isfinite(t).all() for t in merged.values())
    weight = "model.layers.0.self_attn.o_proj.weight"
    base = load_file(family["base"] / "model.safetensors")[weight]
    delta = load_file(family["ft_a"] / "model.safetensors")[weight] - base
    relevance = ScoreReader(scores["ft_a"]).get(weight)
    k = round(0.5 * delta.numel())
    lrp_mask, magnitude = top_k_mask(delta.abs() * relevance, k), top_k_mask(delta.abs(), k)
    overlap = (lrp_mask & magnitude).sum() / k
    assert 0.3 < overlap < 0.98, overlap


def test_cli_bad_inputs_fail_clearly_without_output(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "out.safetensors"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    gpt2_dir = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    save(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=104)), gpt2_dir)
    cases = [
        ((tmp_path / "no-model", "--prompts", prompts_file, "-o", out), "no-model"),
        ((llama_dir, "--prompts", blank, "-o", out), "blank.txt"),
        ((llama_dir, "--prompts", empty, "-o", out), "empty.txt"),
        ((llama_dir, "--prompts", tmp_path / "nope.txt", "-o", out), "nope.txt"),
        ((gpt2_dir, "--prompts", prompts_file, "-o", out), "'gpt2'"),
        (
            (llama_dir, "--prompts", prompts_file, "-o", tmp_path / "no" / "x.safetensors"),
            str(tmp_path / "no"),
        ),
    ]
    for args, culprit in cases:
        result = invoke(*args)
        assert result.exit_code != 0
        assert culprit in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_cli_refuses_to_overwrite(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    result = invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q")
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"
    assert (
        invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q", "--overwrite").exit_code == 0
    )
    assert ScoreReader(out).metadata.num_prompts == len(PROMPTS)


def test_prompt_formats(tmp_path):
    from mergekit_lrp.scoring.prompts import PromptsError, load_prompts

    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"text": "plain"}),
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            ]
        )
    )
    assert load_prompts(jsonl, tokenizer) == ["plain", "user: hi\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PromptsError, match="line 2"):
        load_prompts(bad, tokenizer)
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", tokenizer) == ["a", "b"]
    assert load_prompts(jsonl, tokenizer, limit=1) == ["plain"]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpointing_is_on_only_when_asked_and_restored(checkpointing):
    model = tiny_llama(seed=6)
    with backward_ready(model, checkpointing):
        assert model.is_activation_checkpointing is checkpointing
        assert model.model.layers[0].gradient_checkpointing is checkpointing
    assert not model.is_activation_checkpointing
    assert not model.model.layers[0].gradient_checkpointing


def test_checkpointing_changes_memory_not_scores():
    model = tiny_llama(seed=6)
    with_ckpt = relevance_scores(model, char_tokenizer(), PROMPTS)
    without = relevance_scores(model, char_tokenizer(), PROMPTS,
                               ComputeOptions(gradient_checkpointing=False, progress=False))
    for name in with_ckpt:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-8)
