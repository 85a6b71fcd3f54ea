"""lrp merges multimodal Qwen3.5 end to end; unscored vision tower and MTP pass as configured."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from checkpoints import HYBRID_PROMPTS
from merge_runner import read_weights
from safetensors.torch import load_file

from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

BIN = Path(sys.executable).parent
PROMPTS = HYBRID_PROMPTS  # calibration: the prompts_file fixture writes them


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
  selection: topk
  consensus: none
  normalize: false
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

    from mergekit_lrp.merging.preflight import check_merge

    root = qwen3_5_family["root"]
    if not (root / "ft_b.safetensors").exists():
        pytest.skip("needs the score files of the end-to-end test")
    config = yaml.safe_load(LRP_YAML.replace("./", f"{root}/"))
    config["parameters"]["missing_scores"] = "error"
    with pytest.raises(ScoreFileError, match=r"no scores for tensor '(model\.visual|mtp)\."):
        check_merge(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
