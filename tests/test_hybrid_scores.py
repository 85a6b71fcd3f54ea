"""lrp-compute names the scores of a hybrid MoE checkpoint as the checkpoint names its tensors."""

import torch
import transformers
from checkpoints import HYBRID_PROMPTS as PROMPTS
from checkpoints import char_tokenizer
from safetensors.torch import load_file

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores


def test_moe_scores_are_stored_per_expert_as_the_checkpoint(qwen3_next_family, prompts_file):
    """transformers 5 fuses per-expert checkpoint tensors on load; the score file names
    them as the checkpoint does, each entry being the fused parameter's entry."""
    model_dir = qwen3_next_family["ft"]
    out = qwen3_next_family["root"] / "ft.safetensors"
    options = ComputeOptions(progress=False, score_dtype="float32")  # compared with float32
    summary = compute_scores(str(model_dir), str(prompts_file), str(out), options)
    reader = ScoreReader(out)
    stored = set(load_file(model_dir / "model.safetensors"))
    routers = {name for name in stored if name.endswith("mlp.gate.weight")}
    # routers get no gradient (constant under AttnLRP): left out, reported, not all-zero
    assert routers and set(summary.no_relevance) == routers
    assert reader.names() == stored - routers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    fused = relevance_scores(model, char_tokenizer(), PROMPTS)
    experts = "model.layers.1.mlp.experts."
    size = model.config.moe_intermediate_size
    for e in range(model.config.num_experts):
        gate_up, down = fused[experts + "gate_up_proj"][e], fused[experts + "down_proj"][e]
        torch.testing.assert_close(reader.get(f"{experts}{e}.gate_proj.weight"), gate_up[:size])
        torch.testing.assert_close(reader.get(f"{experts}{e}.up_proj.weight"), gate_up[size:])
        torch.testing.assert_close(reader.get(f"{experts}{e}.down_proj.weight"), down)
    assert reader.get(experts + "0.gate_proj.weight").sum() > 0
