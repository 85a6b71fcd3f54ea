"""The plugin activates in fresh interpreters, costs nothing at start-up, changes nothing else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import lrp_config
from merging import read_weights, run

BIN = Path(sys.executable).parent


def python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_startup_imports_neither_torch_nor_mergekit():
    result = python(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', "
        "'transformers') if m in sys.modules)); print('mergekit_lrp' in sys.modules)"
    )
    assert result.stdout.split() == ["[]", "True"], result.stderr


def test_registry_has_lrp_without_any_import_and_twice_is_fine():
    code = (
        "from mergekit.merge_methods import get; print(get('lrp').spec.name); "
        "import mergekit_lrp; mergekit_lrp.register(); mergekit_lrp.register(); print('ok')"
    )
    assert python(code).stdout.split() == ["lrp", "ok"]
    disabled = python(
        "from mergekit.merge_methods import get; get('lrp')", MERGEKIT_LRP_DISABLE="1"
    )
    assert "Unimplemented merge method lrp" in disabled.stderr


def test_mergekit_yaml_runs_lrp(family, tmp_path):
    """Plain `mergekit-yaml` with `merge_method: lrp`: the plugin activates by itself."""
    config = tmp_path / "lrp.yml"
    config.write_text(yaml.safe_dump(lrp_config(family)))
    out = tmp_path / "merged"
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    assert not any(p.name.startswith(".merged.partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_other_methods_unchanged_by_plugin(family, tmp_path, method):
    """mergekit's own methods give byte-identical output with the plugin active or disabled."""
    config = lrp_config(family)
    config["merge_method"] = method
    for model in config["models"]:
        del model["parameters"]["lrp_scores"]
    active = run(config, tmp_path / "active", random_seed=7)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    disabled = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "disabled"), "--random-seed", "7"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MERGEKIT_LRP_DISABLE": "1"},
    )
    assert disabled.returncode == 0, disabled.stderr[-2000:]
    reference = read_weights(tmp_path / "disabled")
    assert reference.keys() == active.keys()
    assert all(torch.equal(reference[n], active[n]) for n in reference)


@pytest.mark.parametrize("first", ["mergekit_lrp.merging.method", "mergekit_lrp.merging.preflight"])
def test_registered_whatever_is_imported_first(first):
    """Importing the plugin's modules before mergekit's registry must still register lrp."""
    code = f"import {first}\nfrom mergekit.merge_methods import get\nprint(get('lrp').spec.name)"
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["lrp"], result.stderr[-2000:]
