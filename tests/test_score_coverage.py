"""lrp-compute gives every checkpoint tensor a nonzero score; tied embeddings get one."""

from pathlib import Path

import pytest
from checkpoints import PROMPTS, save
from safetensors import safe_open
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files, model_fingerprint
from mergekit_lrp.scoring.attnlrp import SUPPORTED_MODEL_TYPES
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

QUIET = {"progress": False}


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
    tied = make_tiny_model("llama", seed=1, tie_word_embeddings=True, **AS_CHECKPOINT)
    model_dir = save(tied, tmp_path / "tied")
    assert "lm_head.weight" not in checkpoint_tensor_files(model_dir)
    out = tmp_path / "tied.safetensors"
    compute_scores(str(model_dir), str(prompts_file), str(out), ComputeOptions(**QUIET))
    reader = ScoreReader(out)
    assert "lm_head.weight" not in reader.names()
    assert reader.resolve("lm_head.weight") == "model.embed_tokens.weight"
