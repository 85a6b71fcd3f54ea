"""The merged model's README.md: named after the real output, saying how it was merged.

mergekit writes the card into the staging directory, so its title is the hidden
staging name; the card is fixed before the directory is published.
"""

from __future__ import annotations

from pathlib import Path

from mergekit_lrp.merging.parameters import parameter_places, setting_values
from mergekit_lrp.merging.tensor_scores import open_scores
from mergekit_lrp.scores.file import ScoreFileError


def score_files(merge_config) -> list[tuple[str, str]]:
    """(model, score file) for every ``lrp_scores`` value of the config, filters included."""
    found = []
    for _, model, parameters in parameter_places(merge_config):
        for value in setting_values(parameters.get("lrp_scores")):
            if value:
                found.append((str(model) if model is not None else "every model", str(value)))
    return list(dict.fromkeys(found))


def lrp_section(merge_config) -> str:
    lines = [
        "",
        "## Merged with `lrp` (mergekit-lrp)",
        "",
        "This model was merged with the `lrp` method of mergekit-lrp, a mergekit plugin: "
        "each fine-tune's task vector "
        "kept its entries with the highest relevance, read from the score files below. "
        "Reproducing the merge needs mergekit-lrp installed beside mergekit.",
        "",
        "| model | score file | quantity | target | prompts |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, path in score_files(merge_config):
        try:
            meta = open_scores(path).metadata
            row = [meta.quantity, meta.target, str(meta.num_prompts)]
        except ScoreFileError:
            row = ["?", "?", "?"]
        lines.append(f"| {model} | {Path(path).name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def finish_model_card(staging: Path, out: Path, section: str) -> None:
    """Put the output's name where mergekit wrote the staging directory's in README.md,
    and append ``section`` (:func:`lrp_section`)."""
    card = staging / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8").replace(staging.name, out.name)
    card.write_text(text + section, encoding="utf-8")
