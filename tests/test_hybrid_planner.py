"""mergekit plans every hybrid checkpoint tensor; MTP and partial MoE only with plugin patches."""

# See docs/hybrid.md for which planner cases mergekit 0.1.5 already handles (shown here with
# its own functions) and which the plugin patches (each shown to fail with mergekit's
# original function).

import json

import torch
import transformers
from merge_runner import run
from safetensors.torch import load_file

from mergekit_lrp.plugin.planner import ORIGINALS


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
