"""Score files of a family's experts, one set per score-set key, cached beside the family.

A key is ``[<signal>:]<target>-<n>`` (lrp-compute's scoring with ``--method signal``,
default attnlrp, on n calibration prompts of the expert's task), ``gram-<weighting>-<n>``
(a Gram file, RegMean's statistics, on the same prompts: ``lrp-compute --method gram
--token-weighting weighting``) or ``random-<seed>`` (uniform random scores, the floor of
the signal ablation).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def scoring_code_hash() -> str:
    """A hash of the code that computes scores: cached score files are reused only while
    it is unchanged (the family's cache key covers the code that trains the models)."""
    import mergekit_lrp

    package = Path(mergekit_lrp.__file__).parent
    sources = sorted((package / "scoring").rglob("*.py")) + sorted(
        (package / "scores").glob("*.py")
    )
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def score_keys(methods) -> set[str]:
    """The score sets ``methods`` read, over their merge seeds."""
    return {m.scores.format(seed=seed) for m in methods if m.scores for seed in m.seeds}


def family_score_files(family, methods, progress) -> dict[tuple[str, str], Path]:
    """(key, task) -> score file, for every score set ``methods`` read, and (key, "base")
    -> the base's own file for the rows that hold the base; computed once per version of
    the scoring code, under the family's directory."""
    root = family.root / f"scores-{scoring_code_hash()}"
    root.mkdir(exist_ok=True)
    files = compute_score_files(family, score_keys(methods), root, progress)
    for key in {m.scores for m in methods if m.base_weight is not None}:
        files[(key, "base")] = base_score_file(family, key, root, progress)
    return files


def compute_score_files(family, keys, root: Path, progress) -> dict[tuple[str, str], Path]:
    """Score files of each expert under ``root``, for each key; existing files are reused."""
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores

    files = {}
    for key in sorted(keys):
        for task, expert in family.experts.items():
            out = root / f"{task}-{key.replace(':', '-')}.safetensors"
            if not out.exists():
                if key.startswith("random-"):
                    random_scores(expert, out, int(key.split("-")[1]))
                else:
                    chosen, count = key_options(key)
                    prompts = family.write_calibration(task, count, root)
                    options = ComputeOptions(**chosen, progress=False)
                    compute_scores(str(expert), str(prompts), str(out), options)
                progress(f"scored {task} ({key})")
            files[(key, task)] = out
    return files


def base_score_file(family, key: str, root: Path, progress) -> Path:
    """The base model's own file for score-set ``key`` under ``root``, on general prompts
    no evaluation reads: on the real family its general calibration
    (:func:`real_family.general.write_base_calibration`), on a toy family the calibration
    split of its text domain (the base's general data); existing files are reused."""
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores

    out = root / f"base-{key.replace(':', '-')}.safetensors"
    if not out.exists():
        chosen, count = key_options(key)
        if getattr(family, "real", False):
            from real_family.general import write_base_calibration

            prompts = root / "base-general.jsonl"
            write_base_calibration(family.tokenizer, prompts)
        else:
            prompts = family.write_calibration("text", count, root)
        compute_scores(str(family.base), str(prompts), str(out),
                       ComputeOptions(**chosen, progress=False))  # fmt: skip
        progress(f"scored the base ({key})")
    return out


def key_options(key: str) -> tuple[dict, int]:
    """(lrp-compute's options, number of calibration prompts) of a score-set key other
    than ``random-<seed>``."""
    if key.startswith("gram-"):
        _, weighting, count = key.split("-")
        return {"method": "gram", "token_weighting": weighting}, int(count)
    signal, _, rest = key.rpartition(":")
    target, count = rest.rsplit("-", 1)
    return {"method": signal or "attnlrp", "target": target}, int(count)


def random_scores(model_dir: Path, out: Path, seed: int) -> None:
    """Seeded uniform scores for every tensor of ``model_dir``, with its fingerprint."""
    from safetensors import safe_open

    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files, fingerprint_tensors

    tensor_files = checkpoint_tensor_files(model_dir)
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name in sorted(tensor_files):
        with safe_open(tensor_files[name], framework="pt") as handle:
            shape = handle.get_slice(name).get_shape()
        scores[name] = torch.rand(shape, generator=generator)
    meta = ScoreMetadata(
        model_fingerprint=fingerprint_tensors(tensor_files),
        num_prompts=0,
        num_tokens=0,
        target="random",
        model_type="",
        method="random",
        extra={"seed": str(seed)},
    )
    write_scores(out, scores, meta, dtype=torch.float32)
