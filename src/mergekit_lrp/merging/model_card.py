"""The merged model's README.md and saved config, written once every tensor is.

mergekit's card generator looks model paths up on the Hugging Face Hub; offline, or for a
path that reads like a hub id, that can fail after hours of merging. Here the card is
written after the weights, and a failure of mergekit's generator falls back to a card
built from what is known locally: nothing in this step can lose the merge. The card is
titled with the real output's name (not the staging directory's) and says, in words that
follow the settings actually used, how the weights were chosen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_lrp.merging.parameters import parameter_places, setting_values
from mergekit_lrp.merging.provenance import Provenance, saved_config

SIGNAL_NAMES = {
    "attnlrp": "AttnLRP relevance",
    "gradient": "gradient magnitude",
    "fisher": "Fisher information",
    "activation": "input activation statistics",
    "gram": "input Gram matrices (OBS saliency)",
    "random": "random scores",
}


def write_card_and_config(
    staging: Path, out: Path, merge_config, config_source: str | None, provenance: Provenance
) -> None:
    """Write ``mergekit_config.yml`` (every default written out, a header saying how to
    reproduce the merge) and ``README.md`` into ``staging``; never raises for the card."""
    config_text = saved_config(merge_config, config_source, provenance)
    (staging / "mergekit_config.yml").write_text(config_text, encoding="utf-8")
    try:
        from mergekit.card import generate_card

        card = generate_card(config=merge_config, config_yaml=config_text, name=out.name)
    except Exception as error:  # a hub lookup offline, a path mergekit cannot classify
        warnings.warn(
            f"mergekit-lrp: mergekit's model card could not be generated ({error!r}); "
            "wrote one from the local configuration instead",
            stacklevel=2,
        )
        card = local_card(merge_config, config_text, out.name)
    card += method_section(merge_config, provenance)
    (staging / "README.md").write_text(card, encoding="utf-8")


def local_card(merge_config, config_text: str, name: str) -> str:
    """A card without any hub lookup: every model is named by its path as given."""
    front = yaml.safe_dump({"tags": ["mergekit", "merge", "mergekit-lrp"]}, sort_keys=False)
    base = merge_config.base_model
    models = [m for m in merge_config.referenced_models() if m != base]
    lines = [
        "---",
        front.rstrip(),
        "---",
        f"# {name}",
        "",
        "This is a merge of pre-trained language models created using mergekit.",
        "",
        "## Merge Details",
        "",
        f"Merge method: `{merge_config.merge_method}`"
        + (f", with {base} as the base." if base else "."),
        "",
        "Models merged:",
        *[f"* {model}" for model in models],
        "",
        "### Configuration",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def method_section(merge_config, provenance: Provenance) -> str:
    """How the weights were chosen, in words that follow the resolved settings."""
    from mergekit_lrp.merging.methods import spec_of

    describe = spec_of(provenance.method).describe
    lines = [
        "",
        f"## How the weights were chosen (`{provenance.method}`, mergekit-lrp)",
        "",
        f"This model was merged with the `{provenance.method}` method of mergekit-lrp, a "
        "mergekit plugin; reproducing the merge needs it installed beside mergekit.",
        "",
        describe(CardFacts(merge_config, provenance), provenance.parameters),
        "",
    ]
    if provenance.score_files:
        lines += [
            "| model | score file | signal | quantity | target | prompts | checkpoint "
            "fingerprint |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in provenance.score_files:
            lines.append(
                f"| {r.model} | {Path(r.path).name} | {r.method} | {r.quantity} | {r.target} "
                f"| {r.prompts} | {r.fingerprint[:16]} |"
            )
        lines.append("")
    versions = ", ".join(f"{name} {v}" for name, v in provenance.versions.items())
    seed_note = " (drawn for this merge: none was given)" if provenance.seed_drawn else ""
    lines += [
        f"To reproduce the weights: `{provenance.rerun_command()}`{seed_note}, with "
        f"{versions}. `mergekit_config.yml` has every parameter written out.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class CardFacts:
    """What a method's card text asks of the config and the merge's provenance."""

    merge_config: object
    provenance: Provenance

    def values(self, name: str) -> list:
        """Every value ``name`` takes in the config (each model's and filter's), else the
        resolved global one."""
        found = []
        for _, _, parameters in parameter_places(self.merge_config):
            if name in parameters:
                found += setting_values(parameters[name])
        given = self.merge_config.parameters or {}
        if name not in given and name in self.provenance.parameters:
            found.append(self.provenance.parameters[name])
        return list(dict.fromkeys(found))

    def one(self, name: str, what: str) -> str:
        """The value of ``name`` if it has one, else "each model's own ``what``"."""
        values = self.values(name)
        return f"{values[0]:g}" if len(values) == 1 else f"each model's own {what}"

    def signals(self) -> str:
        """The signals of the merge's score files, in words."""
        records = self.provenance.score_files
        names = sorted({SIGNAL_NAMES.get(r.method, r.method) for r in records})
        return " / ".join(names) if names else "|Δ| (no score files: magnitude)"
