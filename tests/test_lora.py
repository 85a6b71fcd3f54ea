"""LoRA fine-tunes end to end: lrp-compute scores a PEFT adapter over its base, and lrp and
circuit merge mergekit's `model: base+adapter` with those files at any merge dtype."""

from pathlib import Path

import pytest
import torch
from helpers import invoke
from merge_runner import run
from safetensors.torch import load_file

from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scores.fingerprint import adapter_fingerprint, model_fingerprint


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(family, tmp_path_factory, prompts_file):
    root = tmp_path_factory.mktemp("lora")
    found = {"root": root}
    for name, seed in (("a", 1), ("b", 2)):
        adapter = make_adapter(family["base"], root / f"lora_{name}", seed)
        scores = root / f"lora_{name}.safetensors"
        result = invoke(
            f"{family['base']}+{adapter}", "--prompts", prompts_file, "-o", scores, "-q"
        )
        assert result.exit_code == 0, result.output
        found[name], found[f"{name}_scores"] = adapter, scores
    return found


def test_an_adapter_is_scored_on_its_base_with_the_adapter_merged(family, adapters, prompts_file):
    """BASE+ADAPTER and the adapter folder alone (its config names the base) write the same
    scores, fingerprinted by base and adapter, and unlike the base's own."""
    alone = adapters["root"] / "alone.safetensors"
    result = invoke(adapters["a"], "--prompts", prompts_file, "-o", alone, "-q")
    assert result.exit_code == 0, result.output
    spelled, folder = load_file(adapters["a_scores"]), load_file(alone)
    assert spelled.keys() == folder.keys()
    assert all(torch.equal(spelled[n], folder[n]) for n in spelled)
    meta = ScoreReader(alone).metadata
    expected = adapter_fingerprint(model_fingerprint(family["base"]), adapters["a"])
    assert meta.model_fingerprint == expected and meta.fingerprint_scheme == "base+adapter-v1"
    base_scores = adapters["root"] / "base.safetensors"
    assert invoke(family["base"], "--prompts", prompts_file, "-o", base_scores, "-q").exit_code == 0
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_file(base_scores)[name], spelled[name])


def lora_config(family, adapters, method="lrp", scores=("a_scores", "b_scores")) -> dict:
    models = []
    for name, key in zip(("a", "b"), scores, strict=True):
        parameters = {"lrp_scores": str(adapters[key])}
        models.append({"model": f"{family['base']}+{adapters[name]}", "parameters": parameters})
    shared = {"drop_order": "scores"} if method == "circuit" else {}
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": models,
        "parameters": shared,
        "dtype": "float32",
    }


@pytest.mark.parametrize("method", ["lrp", "circuit"])
@pytest.mark.parametrize("merge_dtype", ["bfloat16", "float32"])
def test_base_plus_adapter_merges_at_either_merge_dtype(
    family, adapters, tmp_path, monkeypatch, method, merge_dtype
):
    from mergekit.io.tasks import LoaderCache

    # mergekit keeps one loader per model reference for the whole process, whatever
    # --lora-merge-cache and dtype a later merge asks for: start this merge afresh
    monkeypatch.setattr(LoaderCache(), "loaders", {})
    merged = run(
        lora_config(family, adapters, method),
        tmp_path / "out",
        random_seed=0,
        lora_merge_cache=str(tmp_path / "cache"),
        lora_merge_dtype=merge_dtype,
    )
    base = load_file(family["base"] / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name])
    untouched = "model.layers.0.self_attn.k_proj.weight"  # no LoRA there: the base's,
    if merge_dtype == "float32":  # up to the rounding of the merge dtype
        assert torch.equal(merged[untouched], base[untouched])
    else:
        torch.testing.assert_close(merged[untouched], base[untouched], rtol=1e-2, atol=1e-3)


def test_without_a_lora_cache_the_error_names_the_option(family, adapters, tmp_path):
    with pytest.raises(LRPConfigError, match="--lora-merge-cache DIR"):
        run(lora_config(family, adapters), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_adapters_scores_are_refused(family, adapters, tmp_path):
    config = lora_config(family, adapters, scores=("b_scores", "b_scores"))
    with pytest.raises(ScoreFileError, match="lora_b.safetensors: computed on a different"):
        run(config, tmp_path / "out", lora_merge_cache=str(tmp_path / "cache"))
    assert not (tmp_path / "out").exists()
