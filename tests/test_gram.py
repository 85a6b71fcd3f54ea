"""lrp-compute --method gram: each token weighting against a hand computation from the
layers' captured inputs, which layers share a matrix, checkpoint names, resume and two
processes, the file's metadata, bad inputs."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import PROMPTS, char_tokenizer, save
from helpers import interrupted_at_pass, invoke
from safetensors import safe_open
from tiny_models import AS_CHECKPOINT, make_tiny_model
from torch import nn

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files
from mergekit_lrp.scoring import gram_statistics as gram
from mergekit_lrp.scoring import loading, run
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.prompts import read_records, tokenize_records
from mergekit_lrp.scoring.relevance import next_token_positions
from mergekit_lrp.scoring.resume import ResumeError
from mergekit_lrp.scoring.run import compute_scores

BIN = Path(sys.executable).parent
WEIGHTINGS = ("none", "answer", "relevance", "gradient")
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "sort 312"}, {"role": "assistant", "content": "123"}],
    [{"role": "user", "content": "add 2 5"}, {"role": "assistant", "content": "7"}],
]
#: the layers whose matrices the hand computation checks: a shared input (q/k/v), a layer
#: of its own, and the output head (under a backward target it reads one position)
CHECKED = ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama whose tokenizer has a chat template; two texts and two chats with an
    answer as prompts."""
    root = tmp_path_factory.mktemp("gram")
    model = save(make_tiny_model("llama", seed=5, **AS_CHECKPOINT), root / "model")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    records = [{"text": PROMPTS[0]}, {"messages": CHATS[0]}, {"text": PROMPTS[2]}]
    records.append({"messages": CHATS[1]})
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return model, prompts


def gram_file(checkpoint, out: Path, weighting: str, **options) -> Path:
    model, prompts = checkpoint
    options = ComputeOptions(method="gram", token_weighting=weighting, progress=False, **options)
    compute_scores(str(model), str(prompts), str(out), options)
    return out


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gram-files")
    return {w: gram_file(checkpoint, root / f"{w}.safetensors", w) for w in WEIGHTINGS}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def hand_grams(checkpoint, weighting: str) -> dict[str, torch.Tensor]:
    """The mean over prompts of sum_t w_t x_t x_t^T for each layer of CHECKED, from inputs
    captured in an ordinary forward pass (and, for relevance and gradient, the gradient
    captured in an ordinary backward pass with every parameter requiring grad and every
    position's logits computed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    model_dir, prompts_path = checkpoint
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    target = "next-token" if weighting in ("none", "answer") else "predicted"
    prompts = tokenize_records(read_records(prompts_path), tokenizer, target)
    sums = {layer: 0.0 for layer in CHECKED}
    captured = {}

    def keep(layer):
        def hook(_module, args):
            if args[0].requires_grad:
                args[0].retain_grad()
            captured[layer] = args[0]

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in CHECKED]
    for prompt in prompts:
        ids = torch.tensor([prompt.ids])
        tokens = ids.shape[1]
        if weighting in ("none", "answer"):
            with torch.no_grad():
                model(ids)
            for layer in CHECKED:
                x = captured[layer][0]
                if weighting == "answer":
                    x = x[next_token_positions(torch.ones(tokens), prompt.answer_start)]
                sums[layer] = sums[layer] + x.T @ x
        else:
            rules = attnlrp_rules(model) if weighting == "relevance" else contextlib.nullcontext()
            model.zero_grad(set_to_none=True)
            with rules:
                model(ids).logits[0, -1].max().backward()
            for layer in CHECKED:
                x = captured[layer][0].detach()
                relevance = (x * captured[layer].grad[0]).sum(dim=1)
                weights = tokens * relevance.abs() / relevance.abs().sum()
                assert relevance.abs().sum() > 0, layer
                sums[layer] = sums[layer] + (x * weights[:, None]).T @ x
    for handle in handles:
        handle.remove()
    return {layer: total / len(prompts) for layer, total in sums.items()}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_weighting_is_the_hand_computed_weighted_gram(checkpoint, files, weighting):
    stored = tensors(files[weighting])
    gram_of = ScoreReader(files[weighting]).metadata.gram_of
    for layer, expected in hand_grams(checkpoint, weighting).items():
        got = stored[gram_of[layer + ".weight"]]
        scale = expected.abs().max()
        torch.testing.assert_close(got, (expected + expected.T) / 2, rtol=1e-5, atol=1e-6 * scale)


def test_the_weightings_give_different_matrices(files):
    name = "model.layers.1.self_attn.k_proj.input_gram"
    grams = {w: tensors(files[w])[name] for w in WEIGHTINGS}
    for i, a in enumerate(WEIGHTINGS):
        for b in WEIGHTINGS[i + 1 :]:
            assert not torch.allclose(grams[a], grams[b], rtol=1e-3), (a, b)


def test_relevance_weights_keep_each_prompts_total_weight():
    relevance = torch.tensor([2.0, -1.0, 0.0, 1.0])
    weights = gram.relevance_weights(relevance, tokens=8)
    torch.testing.assert_close(weights, torch.tensor([4.0, 2.0, 0.0, 2.0]))
    # no relevance reached the input: uniform weights, the same total
    torch.testing.assert_close(gram.relevance_weights(torch.zeros(4), 8), torch.full((4,), 2.0))


def test_the_file_records_what_it_holds(files):
    for weighting, path in files.items():
        meta = ScoreReader(path).metadata
        assert (meta.method, meta.quantity) == ("gram", "input_gram")
        assert meta.extra["token_weighting"] == weighting
        assert meta.target == ("predicted" if weighting in ("relevance", "gradient") else "inputs")
        assert meta.aliases == {}
        with safe_open(str(path), framework="pt") as handle:
            assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {"F32"}


def test_shared_inputs_share_one_matrix_and_every_linear_weight_has_one(checkpoint, files):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint[0])
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    gram_of = ScoreReader(files["none"]).metadata.gram_of
    assert set(gram_of) == {name + ".weight" for name in linear}
    stored = tensors(files["none"])
    assert set(stored) == set(gram_of.values())
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        attention = {gram_of[f"{prefix}self_attn.{x}_proj.weight"] for x in "qkv"}
        assert attention == {f"{prefix}self_attn.k_proj.input_gram"}  # first of q/k/v sorted
        mlp = {gram_of[f"{prefix}mlp.{x}_proj.weight"] for x in ("gate", "up")}
        assert mlp == {f"{prefix}mlp.gate_proj.input_gram"}
        for own in ("self_attn.o_proj", "mlp.down_proj"):
            assert gram_of[f"{prefix}{own}.weight"] == f"{prefix}{own}.input_gram"
    assert len(stored) == 4 * model.config.num_hidden_layers + 1  # and the output head
    for weight, name in gram_of.items():
        width = linear[weight.removesuffix(".weight")].in_features
        assert stored[name].shape == (width, width)
        assert torch.equal(stored[name], stored[name].T)
        assert torch.linalg.eigvalsh(stored[name].double()).max() > 0


def test_renamed_parameters_get_checkpoint_names(qwen3_5_family, tmp_path):
    """Qwen3.5's checkpoint stores model.language_model.*, the causal LM loads model.*."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "gram.safetensors"
    options = ComputeOptions(method="gram", progress=False)
    summary = compute_scores(str(qwen3_5_family["base"]), str(prompts), str(out), options)
    gram_of = ScoreReader(out).metadata.gram_of
    stored = set(checkpoint_tensor_files(qwen3_5_family["base"]))
    assert gram_of and set(gram_of) <= stored
    assert all(w.startswith("model.language_model.") or w == "lm_head.weight" for w in gram_of)
    prefix = "model.language_model.layers."
    full, linear = prefix + "1.self_attn.", prefix + "0.linear_attn."  # layer types alternate
    assert len({gram_of[f"{full}{x}_proj.weight"] for x in "qkv"}) == 1
    projections = [w for w in gram_of if w.startswith(linear + "in_proj_")]
    assert len(projections) > 1 and len({gram_of[w] for w in projections}) == 1
    assert set(tensors(out)) == set(gram_of.values())
    # the vision tower and the MTP module are not in the causal LM; convolutions not linear
    without = {name for names in summary.without_gram.values() for name in names}
    assert any(n.startswith("mtp.") for n in without)
    assert prefix + "0.linear_attn.conv1d.weight" in without


def test_fused_moe_experts_and_routers_are_listed_not_hooked(qwen3_next_family, tmp_path):
    """Qwen3-Next's experts are one 3-D parameter per layer in transformers 5 (several
    checkpoint tensors each) and its router is no nn.Linear: no Gram matrix, each named
    with its reason; the shared expert's linear layers have theirs."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "gram.safetensors"
    options = ComputeOptions(method="gram", token_weighting="relevance", progress=False)
    summary = compute_scores(str(qwen3_next_family["base"]), str(prompts), str(out), options)
    gram_of = ScoreReader(out).metadata.gram_of
    experts = summary.without_gram["fused on load (experts), not nn.Linear"]
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in experts
    assert not any(".experts." in w for w in gram_of)
    routers = summary.without_gram["not nn.Linear (Qwen3NextTopKRouter)"]
    assert "model.layers.0.mlp.gate.weight" in routers
    shared = "model.layers.0.mlp.shared_expert"
    group = {gram_of[f"{shared}.{x}_proj.weight"] for x in ("gate", "up")}
    assert group == {gram_of[f"{shared}_gate.weight"]}  # one input, three readers
    assert any("fused on load" in line for line in summary.lines())


def test_checkpointing_gives_the_same_matrices():
    """Under checkpointing the layers run again in the backward pass (their hooks too);
    only the model's own forward counts, and the matrices are the same bits."""
    model = make_tiny_model("llama", seed=5, **AS_CHECKPOINT)
    grams = {}
    for checkpointing in (False, True):
        options = ComputeOptions(
            method="gram",
            token_weighting="relevance",
            gradient_checkpointing=checkpointing,
            progress=False,
        )
        grams[checkpointing] = relevance_scores(model, char_tokenizer(), PROMPTS, options)
    assert grams[True].keys() == grams[False].keys()
    for name in grams[False]:
        assert torch.equal(grams[True][name], grams[False][name]), name
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient computed


@contextlib.contextmanager
def interrupted_at_prompt(n: int):
    """The ``n``-th prompt of a Gram run raises KeyboardInterrupt before its pass (forward
    passes too, which interrupted_at_pass does not reach)."""
    real, calls = gram.GramAccumulator.start_prompt, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, *args)

    gram.GramAccumulator.start_prompt = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        gram.GramAccumulator.start_prompt = real


@pytest.mark.parametrize("weighting", ["none", "relevance"])
def test_an_interrupted_run_resumes_to_the_same_bytes(checkpoint, files, weighting, tmp_path):
    out = tmp_path / "gram.safetensors"
    interrupt = interrupted_at_pass(3) if weighting == "relevance" else interrupted_at_prompt(3)
    with interrupt:
        gram_file(checkpoint, out, weighting, checkpoint_every=1)
    assert not out.exists() and run.resume_path(out).exists()
    gram_file(checkpoint, out, weighting, checkpoint_every=1, resume=True)
    assert out.read_bytes() == files[weighting].read_bytes()
    assert not run.resume_path(out).exists()


def test_a_resume_file_of_another_weighting_is_refused(checkpoint, tmp_path):
    out = tmp_path / "gram.safetensors"
    with interrupted_at_pass(3):
        gram_file(checkpoint, out, "relevance", checkpoint_every=1)
    with pytest.raises(ResumeError, match="token_weighting differ"):
        gram_file(checkpoint, out, "gradient", checkpoint_every=1, resume=True)


def error_line(output: str) -> str:
    """The one line an error printed (after transformers' loading bar, if any)."""
    lines = [line for line in output.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def lrp_compute(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """lrp-compute in fresh processes with one thread each (torchrun's when several)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "--no-python"]  # fmt: skip
    command = [*(launcher if processes > 1 else []), str(BIN / "lrp-compute"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("count", [2, 4])
def test_two_processes_write_what_one_writes(checkpoint, tmp_path, count):
    """Each process sums its share; the shares are added once. With one prompt each the
    two float32 sums are the one process's in another order of one addition (the same
    bytes); with more, float rounding may differ in the last bits."""
    model, prompts = checkpoint
    lines = prompts.read_text().splitlines()[:count]
    subset = tmp_path / "prompts.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    outputs = {}
    for processes in (1, 2):
        outputs[processes] = tmp_path / f"gram-{processes}.safetensors"
        result = lrp_compute(str(model), "--prompts", str(subset), "-o", str(outputs[processes]),
                             "--method", "gram", "--token-weighting", "relevance",
                             "--threads", "1", "-q", processes=processes)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (ScoreReader(outputs[p]).metadata for p in (1, 2))
    assert (two.num_prompts, two.num_tokens, two.gram_of) == (
        one.num_prompts,
        one.num_tokens,
        one.gram_of,
    )
    if count == 2:
        assert outputs[2].read_bytes() == outputs[1].read_bytes()
    else:
        expected, got = tensors(outputs[1]), tensors(outputs[2])
        for name in expected:
            scale = expected[name].abs().max()
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale)


def test_score_dtype_is_float32_for_gram_unless_asked(checkpoint, tmp_path):
    assert ComputeOptions(method="gram").score_dtype == "float32"
    assert ComputeOptions().score_dtype == "bfloat16"  # scores keep their default
    out = gram_file(checkpoint, tmp_path / "bf16.safetensors", "none", score_dtype="bfloat16")
    with safe_open(str(out), framework="pt") as handle:
        assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {"BF16"}


# ---------------------------------------------------------------- bad inputs


class ScaledLinear(nn.Module):
    """A linear layer that is not a torch.nn.Linear (as wrappers of quantised or adapted
    layers are): weight, bias and F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def without_linear_layers(net: nn.Module) -> nn.Module:
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, ScaledLinear(module))
    return net


def test_a_model_without_hookable_linear_layers_is_refused_before_writing(
    checkpoint, tmp_path, monkeypatch
):
    real = loading._load
    monkeypatch.setattr(loading, "_load", lambda *a, **k: without_linear_layers(real(*a, **k)))
    model, prompts = checkpoint
    out = tmp_path / "gram.safetensors"
    result = invoke(model, "--prompts", prompts, "-o", out, "--method", "gram", "-q")
    assert result.exit_code == 1
    message = error_line(result.output)
    assert message.startswith("Error: --method gram hooks torch.nn.Linear layers")
    assert "LlamaForCausalLM" in message and "use --method attnlrp" in message
    assert list(tmp_path.iterdir()) == []


class KeywordLinear(nn.Linear):
    def forward(self, hidden):  # called by keyword: no positional input for the hook
        return super().forward(hidden)


class TinyNet(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.embed, self.proj = nn.Embedding(8, 4), layer

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=None, logits_to_keep=None):
        return self.proj(hidden=self.embed(input_ids))


def test_a_linear_layer_whose_input_cannot_be_read_is_named():
    net = TinyNet(KeywordLinear(4, 4))
    with pytest.raises(ComputeError, match="cannot read the input of linear layer proj.weight"):
        gram.GramAccumulator(net, dict(net.named_parameters()), "none")


def test_token_weighting_needs_method_gram(checkpoint, tmp_path):
    with pytest.raises(ComputeError, match="--token-weighting .* --method attnlrp has no token"):
        ComputeOptions(token_weighting="relevance")
    with pytest.raises(ComputeError, match="--token-weighting must be one of none, answer"):
        ComputeOptions(method="gram", token_weighting="attention")
    model, prompts = checkpoint
    out = tmp_path / "scores.safetensors"
    result = invoke(model, "--prompts", prompts, "-o", out, "--method", "fisher",
                    "--token-weighting", "answer")  # fmt: skip
    assert result.exit_code == 1
    assert error_line(result.output).startswith("Error: --token-weighting weights the tokens")
    assert not out.exists()


def test_answer_weighting_without_answer_tokens_is_refused(checkpoint, tmp_path):
    model, _ = checkpoint
    prompts = tmp_path / "one-token.txt"
    prompts.write_text("a\nb\n")  # a one-token prompt has no next token to score
    out = tmp_path / "gram.safetensors"
    result = invoke(model, "--prompts", prompts, "-o", out, "--method", "gram",
                    "--token-weighting", "answer", "-q")  # fmt: skip
    assert result.exit_code == 1
    message = error_line(result.output)
    assert "is zero: no token of these prompts" in message and "answer" in message
    assert not out.exists()


class Switching(nn.Module):
    """Two linear layers that read one tensor in the first forward, two copies later."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b = nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.calls = 0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=None, logits_to_keep=None):
        x = self.embed(input_ids)
        self.calls += 1
        return self.a(x) + self.b(x if self.calls == 1 else x.clone())


def test_layers_that_stop_sharing_their_input_are_named():
    net = Switching()
    accumulator = gram.GramAccumulator(net, dict(net.named_parameters()), "none")
    assert accumulator.gram_of == {"a.weight": "a.input_gram", "b.weight": "a.input_gram"}
    accumulator.attach()
    accumulator.start_prompt(3, None)
    with pytest.raises(ComputeError, match="linear layer b.weight read an input of its own"):
        net(torch.tensor([[1, 2, 3]]))
    accumulator.detach()
