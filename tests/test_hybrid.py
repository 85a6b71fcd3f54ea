"""Hybrid Qwen3.5 / Qwen3-Next models: AttnLRP rules, score names, planner, end to end.

See docs/hybrid.md for the rule derivations and for which planner cases mergekit 0.1.5
already handles (shown here with its own functions) and which the plugin patches (each
shown to fail with mergekit's original function).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from checkpoints import VOCAB, char_tokenizer
from helpers import relevance
from merging import read_weights, run
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_hybrid, make_tiny_qwen3_5_multimodal, train_on_a_cycle
from transformers.models.qwen3_5 import modeling_qwen3_5

from mergekit_lrp.plugin.planner import ORIGINALS
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scoring.attnlrp import attnlrp_rules, hybrid
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

torch.set_num_threads(1)

BIN = Path(sys.executable).parent
PROMPT = torch.tensor([[5, 17, 42, 8, 77, 23, 61, 30]])
PROMPTS = ["the cat sat on the mat", "12+34=46", "reverse: abc -> cba", "key k7 -> v3"]


# --- the rules -------------------------------------------------------------------------


BUILDERS = {
    "qwen3_5_text": lambda: make_tiny_hybrid("qwen3_5_text"),
    "qwen3_next": lambda: make_tiny_hybrid("qwen3_next"),
    "qwen3_5": make_tiny_qwen3_5_multimodal,
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_hybrid_rules_keep_logits_and_reach_every_language_parameter(kind):
    """Forward unchanged; every language-model parameter gets finite, nonzero relevance,
    except the MoE routers (routing weights are constants by design); the vision tower is
    not part of a text pass."""
    model = BUILDERS[kind]()
    plain = model(PROMPT).logits
    with attnlrp_rules(model):
        patched = model(PROMPT).logits
    # the rules compute the delta rule token by token, transformers in chunks: equal up to
    # float32 rounding (measured max |difference| <= 1e-7 on these models)
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(PROMPT).logits, plain)  # restored

    target, inputs, parameters = relevance(model, PROMPT)
    assert torch.isfinite(target) and torch.isfinite(inputs).all()
    names = [n for n, _ in model.named_parameters() if ".visual." not in n]
    routers = {n for n in names if n.endswith("mlp.gate.weight")}
    assert bool(routers) == (kind == "qwen3_next")
    assert set(parameters) == set(names) - routers  # routers: no gradient path at all
    for name, value in parameters.items():
        assert torch.isfinite(value).all() and value.abs().sum() > 0, name


def test_left_padding_does_not_change_relevance():
    """Padding is zeroed before the convolution and the recurrence: relevance unchanged."""
    model = make_tiny_hybrid("qwen3_next")
    target, inputs, parameters = relevance(model, PROMPT)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), PROMPT], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(PROMPT)], 1)
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids)
    embeddings.retain_grad()
    with attnlrp_rules(model):
        padded = model(inputs_embeds=embeddings, attention_mask=mask).logits[0, -1].max()
        padded.backward()
    torch.testing.assert_close(padded.detach(), target)
    torch.testing.assert_close((embeddings * embeddings.grad)[:, 3:], inputs, rtol=1e-4, atol=1e-6)
    for name, p in model.named_parameters():
        if name in parameters:
            torch.testing.assert_close(p * p.grad, parameters[name], rtol=1e-4, atol=1e-6)


def test_delta_rule_forward_is_transformers_recurrent_kernel():
    """Same operations as transformers' recurrent reference: bit-identical values."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 6, 2, 8, generator=generator) for _ in "qk")
    v = torch.randn(1, 6, 4, 8, generator=generator)
    g = -torch.rand(1, 6, 4, generator=generator)
    beta = torch.rand(1, 6, 4, generator=generator)
    reference, _ = modeling_qwen3_5.torch_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True
    )
    chunked, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True
    )
    ours, _ = hybrid.gated_delta_rule(q, k, v, g=g, beta=beta)
    assert torch.equal(ours, reference)
    torch.testing.assert_close(ours, chunked, rtol=1e-5, atol=1e-6)


def test_delta_rule_conserves_relevance_exactly():
    """Uniform rules, the identity rule on exp, constant L2 denominators: the relevance of
    q, k, v, beta and the log decay g sums to the output's (no bias anywhere). The kernel
    computes in float32 as transformers' does, hence the float32 tolerance (measured
    relative difference 1.5e-7)."""
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 5, 2, 8, generator=generator, dtype=torch.float64) for _ in "qk")
    v = torch.randn(1, 5, 4, 8, generator=generator, dtype=torch.float64)
    g = -torch.rand(1, 5, 4, generator=generator, dtype=torch.float64) - 0.1
    beta = torch.rand(1, 5, 4, generator=generator, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, g, beta)]
    out, _ = hybrid.gated_delta_rule(*inputs[:3], g=g, beta=beta)
    seed = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(seed)
    total = sum((t * t.grad).sum() for t in inputs)
    torch.testing.assert_close(total, (out * seed).sum().detach(), rtol=1e-5, atol=1e-8)
    assert all((t * t.grad).abs().sum() > 0 for t in inputs)


def block_relevance(module, inputs, *extra_params):
    """(relevance in, relevance out, relevance of ``extra_params``) of one module call."""
    x = inputs.clone().requires_grad_()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * seed).sum().backward()
    absorbed = sum((p * p.grad).sum() for p in extra_params) if extra_params else 0.0
    return (x * x.grad).sum(), (out * seed).sum().detach(), absorbed


def test_linear_attention_and_moe_blocks_conserve_relevance(monkeypatch):
    """Block level, with the gate stabiliser at 1e-12 (so no share is absorbed there):
    a GatedDeltaNet passes all relevance to its input except the share of ``dt_bias``
    (epsilon rule on ``a + dt_bias``); an MoE block passes all of it (router constant)."""
    monkeypatch.setattr(hybrid, "GATE_EPSILON", 1e-12)
    model = make_tiny_hybrid("qwen3_next")
    hidden = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    with attnlrp_rules(model):
        net = model.model.layers[0].linear_attn
        r_in, r_out, r_bias = block_relevance(net, hidden, net.dt_bias)
        torch.testing.assert_close(r_in + r_bias, r_out, rtol=1e-4, atol=1e-6)
        r_in, r_out, _ = block_relevance(model.model.layers[0].mlp, hidden)
        torch.testing.assert_close(r_in, r_out, rtol=1e-4, atol=1e-6)


def train_hybrid_on_a_cycle(model_type, seed=0, steps=100):
    """A tiny hybrid trained (~3 s) to continue a repeated random 7-token cycle."""
    return train_on_a_cycle(make_tiny_hybrid(model_type, seed=seed), seed=seed, steps=steps)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_next"])
def test_conservation_on_trained_hybrids(model_type):
    """Input relevance sums to about the target logit; plain gradient x input does not.

    Measured sum(input relevance) / target logit, 7 prompts each (run
    ``pytest tests/test_hybrid.py -k conservation``, seeds via ``train_on_a_cycle``):
    qwen3_5_text seed 0: 0.968-0.999, seeds 0-7: 0.956-1.006; qwen3_next seed 0:
    0.960-0.986, seeds 0-7: 0.915-1.045. The deficit is the softmax rule of the full
    attention layers, ``dt_bias``'s share and the gate stabiliser. The bounds [0.90,
    1.05] cover every seed measured with >= 0.05 margin around seed 0. Plain gradient x
    input measured |ratio| <= 0.005 (final RMSNorm: scale invariance).
    """
    model, cycle = train_hybrid_on_a_cycle(model_type)
    for start in range(7):
        ids = cycle[start : start + 12][None]
        target, inputs, _ = relevance(model, ids)
        ratio = inputs.sum() / target
        assert 0.90 <= ratio <= 1.05, (start, ratio.item())
        plain_target, plain_inputs, _ = relevance(model, ids, rules=False)
        torch.testing.assert_close(plain_target, target)
        assert abs(plain_inputs.sum() / plain_target - 1) > 0.9


# --- checkpoints -----------------------------------------------------------------------


def perturbed(state: dict, seed: int, keep=lambda name: True) -> dict:
    """A deterministic stand-in fine-tune: a seeded dense perturbation of every tensor."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + 0.05 * value.abs().mean() * torch.randn(value.shape, generator=generator)
        for name, value in state.items()
        if keep(name)
    }


def write_checkpoint(model_dir: Path, config_dir: Path, tensors: dict) -> Path:
    """Copy config and tokenizer from ``config_dir``, write ``tensors`` as the weights."""
    model_dir.mkdir(parents=True)
    for file in config_dir.iterdir():
        if file.suffix != ".safetensors":
            (model_dir / file.name).write_bytes(file.read_bytes())
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def mtp_tensors(state: dict, seed: int) -> dict:
    """An MTP module as Qwen3.5 checkpoints store it: fc, norms, one full-attention layer."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "mtp.fc.weight": (32, 64),
        "mtp.norm.weight": (32,),
        "mtp.pre_fc_norm_embedding.weight": (32,),
        "mtp.pre_fc_norm_hidden.weight": (32,),
    }
    layer = "model.language_model.layers.1."
    for name, value in state.items():
        if name.startswith(layer):
            shapes["mtp.layers.0." + name[len(layer) :]] = tuple(value.shape)
    return {n: 0.02 * torch.randn(s, generator=generator) for n, s in shapes.items()}


@pytest.fixture(scope="module")
def qwen3_5_family(tmp_path_factory) -> dict[str, Path]:
    """A Qwen3.5-layout base (hybrid layers, vision tower, MTP) and two fine-tunes;
    ``ft_b`` dropped the MTP module, as some published fine-tunes do."""
    root = tmp_path_factory.mktemp("qwen3_5")
    model = make_tiny_qwen3_5_multimodal(vocab_size=VOCAB)
    model.save_pretrained(root / "saved")
    char_tokenizer().save_pretrained(root / "saved")
    state = load_file(root / "saved" / "model.safetensors")
    state.update(mtp_tensors(state, seed=5))
    paths = {"root": root, "base": write_checkpoint(root / "base", root / "saved", state)}
    paths["ft_a"] = write_checkpoint(root / "ft_a", root / "saved", perturbed(state, 1))
    no_mtp = perturbed(state, 2, keep=lambda name: not name.startswith("mtp."))
    paths["ft_b"] = write_checkpoint(root / "ft_b", root / "saved", no_mtp)
    return paths


@pytest.fixture(scope="module")
def qwen3_next_family(tmp_path_factory) -> dict[str, Path]:
    """A Qwen3-Next base with MoE in layers 0, 1, 3 (layer 2 dense) and one fine-tune."""
    root = tmp_path_factory.mktemp("qwen3_next")
    model = make_tiny_hybrid("qwen3_next", vocab_size=VOCAB)
    model.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    state = load_file(root / "base" / "model.safetensors")
    return {
        "root": root,
        "base": root / "base",
        "ft": write_checkpoint(root / "ft", root / "base", perturbed(state, 3)),
    }


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_moe_scores_are_stored_per_expert_as_the_checkpoint(qwen3_next_family, prompts_file):
    """transformers 5 fuses per-expert checkpoint tensors on load; the score file names
    them as the checkpoint does, each entry being the fused parameter's entry."""
    model_dir = qwen3_next_family["ft"]
    out = qwen3_next_family["root"] / "ft.safetensors"
    options = ComputeOptions(progress=False, score_dtype="float32")  # compared with float32
    compute_scores(str(model_dir), str(prompts_file), str(out), options)
    reader = ScoreReader(out)
    assert reader.names() == set(load_file(model_dir / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    fused = relevance_scores(model, char_tokenizer(), PROMPTS)
    experts = "model.layers.1.mlp.experts."
    size = model.config.moe_intermediate_size
    for e in range(model.config.num_experts):
        gate_up, down = fused[experts + "gate_up_proj"][e], fused[experts + "down_proj"][e]
        torch.testing.assert_close(reader.get(f"{experts}{e}.gate_proj.weight"), gate_up[:size])
        torch.testing.assert_close(reader.get(f"{experts}{e}.up_proj.weight"), gate_up[size:])
        torch.testing.assert_close(reader.get(f"{experts}{e}.down_proj.weight"), down)
    assert reader.get("model.layers.1.mlp.gate.weight").sum() == 0  # router: constant
    assert reader.get(experts + "0.gate_proj.weight").sum() > 0


# --- planner cases ---------------------------------------------------------------------


def merge_config(family, method="task_arithmetic", **extra) -> dict:
    models = [m for m in ("ft_a", "ft_b", "ft") if m in family]
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family[m]), "parameters": {"weight": 0.5}} for m in models],
        "dtype": "float32",
        **extra,
    }


def planned(config: dict, get_architecture_info=None) -> dict:
    """Output tensor name -> WeightInfo, planned by mergekit's planner (nothing merged)."""
    from mergekit.architecture import get_architecture_info as patched
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    merge = MergeConfiguration.model_validate(config)
    options = MergeOptions(quiet=True)
    arch_info = (get_architecture_info or patched)(merge, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(merge, arch_info, trust_remote_code=False)
    planner = MergePlanner(merge, arch_info, options=options, out_model_config=out_config)
    planner._plan()
    return {weight.name: weight for weight, _ in planner._tensors}


def test_mergekit_has_no_json_definition_for_these_models(qwen3_5_family, qwen3_next_family):
    """mergekit 0.1.5 infers both from the transformers class (checking every layer)."""
    from mergekit.architecture import arch_info_for_config

    for family in (qwen3_5_family, qwen3_next_family):
        config = transformers.AutoConfig.from_pretrained(family["base"])
        assert arch_info_for_config(config) is None, config.architectures


def test_hybrid_layers_and_vision_already_planned_by_mergekit(qwen3_5_family):
    """Already handled (no patch): linear_attn / self_attn templates are optional because
    not every layer has them, and each layer gets exactly the tensors it has; the vision
    tower is part of the inferred architecture."""
    names = planned(merge_config(qwen3_5_family), ORIGINALS["get_architecture_info"])
    stored = set(load_file(qwen3_5_family["base"] / "model.safetensors"))
    assert set(names) == {n for n in stored if not n.startswith("mtp.")}
    assert names["model.language_model.layers.0.linear_attn.A_log"].optional
    assert names["model.language_model.layers.1.self_attn.q_proj.weight"].optional


def test_mtp_is_dropped_by_mergekit_and_kept_by_the_patch(qwen3_5_family):
    config = merge_config(qwen3_5_family)
    unpatched = planned(config, ORIGINALS["get_architecture_info"])
    assert not [n for n in unpatched if n.startswith("mtp.")]  # mergekit 0.1.5 drops MTP
    patched = planned(config)
    mtp = {n: w for n, w in patched.items() if n.startswith("mtp.")}
    stored = load_file(qwen3_5_family["base"] / "model.safetensors")
    assert set(mtp) == {n for n in stored if n.startswith("mtp.")}
    assert all(w.optional for w in mtp.values())  # ft_b lacks them
    assert set(patched) - set(mtp) == set(unpatched)  # nothing else changes

    # merged: ft_a's task vector added, ft_b (no MTP) contributes nothing (base passes)
    merged = run(config, qwen3_5_family["root"] / "task_arithmetic")
    ft_a = load_file(qwen3_5_family["ft_a"] / "model.safetensors")
    for name in mtp:
        expected = stored[name] + 0.5 * (ft_a[name] - stored[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_mtp_is_kept_also_with_a_json_definition(qwen3_5_family, monkeypatch):
    """With a JSON definition (mergekit 0.1.5 has none; later ones do, written from the
    transformers class, without MTP): hybrid templates marked optional plan fine, MTP
    again only with the patch."""
    from mergekit.architecture.json_definitions import NAME_TO_ARCH, _load_architecture_json

    layer = "model.language_model.layers.${layer_index}."
    stored = load_file(qwen3_5_family["base"] / "model.safetensors")
    templates = sorted(
        {layer + n.split(".", 4)[4] for n in stored if n.startswith("model.language_model.layers.")}
    )
    definition = {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "pre_weights": [{"name": "model.language_model.embed_tokens.weight"}],
        "post_weights": [{"name": "model.language_model.norm.weight"}, {"name": "lm_head.weight"}],
        "num_layers_config_key": "text_config.num_hidden_layers",
        "layer_templates": {
            "weights": [
                {"name": t, "optional": "_attn." in t or "self_attn." in t} for t in templates
            ]
        },
    }
    arch = _load_architecture_json(json.dumps(definition))
    monkeypatch.setitem(NAME_TO_ARCH, "Qwen3_5ForConditionalGeneration", [arch])
    config = merge_config(qwen3_5_family)
    unpatched = planned(config, ORIGINALS["get_architecture_info"])
    language = {n for n in stored if n.startswith(("model.language_model.", "lm_head"))}
    assert set(unpatched) == language
    assert set(planned(config)) == language | {n for n in stored if n.startswith("mtp.")}


def test_partial_moe_experts_are_dropped_by_mergekit_and_kept_by_the_patch(
    qwen3_next_family, monkeypatch
):
    """Experts exist only in some layers, so their (fused, converted) template is optional;
    mergekit 0.1.5 then looks for the fused name in the checkpoints, finds none, and
    silently leaves every layer's experts out (the merged model loads them random)."""
    from mergekit.plan import MergePlanner

    config = merge_config(qwen3_next_family)
    fused = {
        f"model.layers.{i}.mlp.experts.{p}"
        for i in (0, 1, 3)
        for p in ("gate_up_proj", "down_proj")
    }
    patched = planned(config)
    assert fused <= set(patched) and all(patched[n].optional for n in fused)
    with monkeypatch.context() as m:
        m.setattr(MergePlanner, "plan_tensor", ORIGINALS["plan_tensor"])
        unpatched = planned(config)
    assert not fused & set(unpatched)
    assert set(patched) - set(unpatched) == fused

    out = qwen3_next_family["root"] / "merged"
    run(config, out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model, info = merged
    assert not info["missing_keys"], info["missing_keys"]
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen3_next_family["base"])
    ft = transformers.AutoModelForCausalLM.from_pretrained(qwen3_next_family["ft"])
    for name in fused:
        expected = base.get_parameter(name) + 0.5 * (
            ft.get_parameter(name) - base.get_parameter(name)
        )
        torch.testing.assert_close(model.get_parameter(name), expected, rtol=0, atol=1e-6)


# --- end to end ------------------------------------------------------------------------


LRP_YAML = """\
merge_method: lrp
base_model: ./base
models:
  - model: ./ft_a
    parameters: {weight: 1.0, lrp_scores: ./ft_a.safetensors}
  - model: ./ft_b
    parameters: {weight: 1.0, lrp_scores: ./ft_b.safetensors}
parameters:
  density: 0.5
  # no scores: the vision tower (text-only calibration) and MTP (not in the transformers
  # class); MTP merged by |delta|, the vision tower stays the base's
  missing_scores:
    - filter: mtp.
      value: magnitude
    - value: base
dtype: float32
"""


def test_lrp_merge_of_qwen3_5_fine_tunes_end_to_end(qwen3_5_family, prompts_file):
    """lrp-compute on both fine-tunes, mergekit-yaml with lrp (fresh process), then the
    merged checkpoint loads with transformers (both classes) and generates text."""
    root = qwen3_5_family["root"]
    for name in ("ft_a", "ft_b"):
        summary = compute_scores(
            str(qwen3_5_family[name]),
            str(prompts_file),
            str(root / f"{name}.safetensors"),
            ComputeOptions(progress=False),
        )
        assert 0.5 < summary.conservation < 1.5, summary.lines()
        unscored = set(summary.unscored_tensors)
        assert unscored and all(n.startswith(("model.visual.", "mtp.")) for n in unscored)
        assert any(n.startswith("mtp.") for n in unscored) == (name == "ft_a")
        reader = ScoreReader(root / f"{name}.safetensors")
        assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in reader.names()

    config = root / "lrp.yml"
    config.write_text(LRP_YAML)
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(config), str(root / "merged")],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONHASHSEED": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    merged = read_weights(root / "merged")
    base = load_file(qwen3_5_family["base"] / "model.safetensors")
    assert set(merged) == set(base)  # vision tower and MTP included
    ft_a, ft_b = (load_file(qwen3_5_family[n] / "model.safetensors") for n in ("ft_a", "ft_b"))
    for name, value in base.items():
        if name.startswith("model.visual.") and value.ndim >= 2:
            assert torch.equal(merged[name], value), name  # missing_scores: base
        elif name.startswith("model.visual."):  # 1-D: protected, whole task vectors added
            expected = value + (ft_a[name] - value) + (ft_b[name] - value)
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    changed = (merged["mtp.fc.weight"] != base["mtp.fc.weight"]).float().mean()
    assert changed == 0.5  # only ft_a has MTP: its top half by |delta|
    qkv = "model.language_model.layers.2.linear_attn.in_proj_qkv.weight"
    assert 0.5 <= (merged[qkv] != base[qkv]).float().mean() < 1.0  # two sparse task vectors

    full, info = transformers.AutoModelForImageTextToText.from_pretrained(
        root / "merged", output_loading_info=True
    )
    assert type(full).__name__ == "Qwen3_5ForConditionalGeneration"
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {
        n for n in base if n.startswith("mtp.")
    }
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "merged")
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0, ids.shape[1] :]), str)


def test_unscored_vision_tensors_are_named_under_missing_scores_error(qwen3_5_family):
    """Already handled (no patch): with missing_scores: error the preflight names the
    first unscored tensor (after the end-to-end test wrote the score files)."""
    import mergekit.merge_methods  # noqa: F401  first: importing preflight first breaks lrp's registration
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_lrp.merging.preflight import preflight

    root = qwen3_5_family["root"]
    if not (root / "ft_b.safetensors").exists():
        pytest.skip("needs the score files of the end-to-end test")
    config = yaml.safe_load(LRP_YAML.replace("./", f"{root}/"))
    config["parameters"]["missing_scores"] = "error"
    with pytest.raises(ScoreFileError, match=r"no scores for tensor '(model\.visual|mtp)\."):
        preflight(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
