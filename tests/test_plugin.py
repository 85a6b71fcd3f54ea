"""The plugin activates in fresh interpreters, costs nothing at start-up, changes nothing else."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import lrp_config
from merge_runner import mergekit_yaml, read_weights, run

import mergekit_lrp

SRC = str(Path(mergekit_lrp.__file__).parent.parent)


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
    out = tmp_path / "merged"
    result = mergekit_yaml(lrp_config(family), out)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    assert not any(p.name.startswith(".merged.partial") for p in tmp_path.iterdir())


def test_other_methods_unchanged_by_plugin(family, tmp_path):
    """mergekit's own methods give byte-identical output with the plugin active or disabled
    (one disabled interpreter merges them all)."""
    configs = {}
    for method in ("ties", "dare_ties", "task_arithmetic"):
        config = lrp_config(family)
        config["merge_method"] = method
        for model in config["models"]:
            del model["parameters"]["lrp_scores"]
        configs[method] = config
    code = (
        "import json, sys\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "for method, config in json.loads(sys.argv[1]).items():\n"
        "    run_merge(MergeConfiguration.model_validate(config), f'{sys.argv[2]}/{method}',"
        " MergeOptions(quiet=True, random_seed=7))\n"
    )
    disabled = subprocess.run(
        [sys.executable, "-c", code, json.dumps(configs), str(tmp_path / "disabled")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MERGEKIT_LRP_DISABLE": "1"},
    )
    assert disabled.returncode == 0, disabled.stderr[-2000:]
    for method, config in configs.items():
        active = run(config, tmp_path / method, random_seed=7)
        reference = read_weights(tmp_path / "disabled" / method)
        assert reference.keys() == active.keys()
        assert all(torch.equal(reference[n], active[n]) for n in reference), method


def test_objects_frozen_out_of_the_collector_only_during_the_merge(family, tmp_path, monkeypatch):
    """The guard freezes the objects alive before mergekit's merge (gc.freeze) and
    unfreezes them after it, also when the merge fails."""
    import gc

    from mergekit_lrp.merging.methods import lrp as method

    frozen_during = []
    select = method.Selection.select

    def counting(self, *args, **kwargs):
        frozen_during.append(gc.get_freeze_count())
        return select(self, *args, **kwargs)

    monkeypatch.setattr(method.Selection, "select", counting)
    assert gc.get_freeze_count() == 0
    run(lrp_config(family), tmp_path / "merged")
    assert frozen_during and min(frozen_during) > 0 and gc.get_freeze_count() == 0

    def failing(self, *args, **kwargs):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(method.Selection, "select", failing)
    with pytest.raises(RuntimeError, match="merge failed"):
        run(lrp_config(family), tmp_path / "failed")
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    "first", ["mergekit_lrp.merging.methods.lrp_kernel", "mergekit_lrp.merging.preflight"]
)
def test_registered_whatever_is_imported_first(first):
    """Importing the plugin's modules before mergekit's registry must still register lrp."""
    code = f"import {first}\nfrom mergekit.merge_methods import get\nprint(get('lrp').spec.name)"
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["lrp"], result.stderr[-2000:]


def test_disabled_plugin_says_why_lrp_is_unknown(family, tmp_path):
    disabled = {"MERGEKIT_LRP_DISABLE": "1"}
    result = mergekit_yaml(lrp_config(family), tmp_path / "out", env=disabled)
    assert result.returncode != 0
    assert "Error: Unimplemented merge method lrp" in result.stderr
    assert "disabled by MERGEKIT_LRP_DISABLE" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_register_under_python_dash_s_installs_the_checks_too(family, tmp_path):
    """Without site, register() must bring the preflight: a score file of another fine-tune
    is refused, as under mergekit-yaml."""
    config = lrp_config(family, per_model={"ft_a": {"lrp_scores": str(family["ft_b_scores"])}})
    code = (
        "import json, sys; sys.path[:0] = sys.argv[3:]\n"
        "import mergekit_lrp; mergekit_lrp.register()\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "run_merge(MergeConfiguration.model_validate(json.loads(sys.argv[1])), sys.argv[2],"
        " MergeOptions(quiet=True))\n"
    )
    paths = [SRC, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, json.dumps(config), str(tmp_path / "out"), *paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "different checkpoint" in result.stderr, result.stderr[-2000:]


def test_unknown_mergekit_version_merges_and_names_the_fixes_that_are_off(family, tmp_path):
    code = (
        "import importlib.metadata as md, json, sys, warnings\n"
        "real = md.version\n"
        "md.version = lambda name: '0.1.99' if name == 'mergekit' else real(name)\n"
        "warnings.simplefilter('always')\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "run_merge(MergeConfiguration.model_validate(json.loads(sys.argv[1])), sys.argv[2],"
        " MergeOptions(quiet=True))\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(lrp_config(family)), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").exists()
    for fix in ("deterministic architecture choice", "MTP tensors kept"):
        assert f"planner fix '{fix}' is off for mergekit 0.1.99" in result.stderr
