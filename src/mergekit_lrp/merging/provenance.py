"""What a merge output records so that anyone can reproduce it: the versions, the random
seed (drawn when none was given), every parameter value the method resolved (defaults
included), and each score file with the fingerprint of the checkpoint it belongs to.

:func:`saved_config` renders it as the ``mergekit_config.yml`` of the output: the user's
config with every default written out, under a commented header; rerunning
``mergekit-yaml`` on that file with the recorded seed gives the same weights.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import yaml

from mergekit_lrp.merging.parameters import parameter_places, setting_values
from mergekit_lrp.merging.tensor_scores import open_scores
from mergekit_lrp.scores.file import ScoreFileError

PACKAGES = ("mergekit-lrp", "mergekit", "torch", "transformers")


def draw_seed() -> int:
    """A random seed for a merge run without ``--random-seed`` (recorded, so it can be
    given again)."""
    return secrets.randbelow(2**31)


@dataclass(frozen=True)
class ScoreFileRecord:
    """One ``lrp_scores`` file as the merge used it."""

    model: str
    path: str
    method: str = "?"
    quantity: str = "?"
    target: str = "?"
    prompts: str = "?"
    fingerprint: str = "?"


@dataclass(frozen=True)
class Provenance:
    method: str
    seed: int
    #: True when no seed was given and this one was drawn
    seed_drawn: bool
    versions: dict[str, str]
    #: the method's global parameters with their resolved values (config or default)
    parameters: dict[str, object]
    #: parameter names whose value is the method's default (written out in the config)
    defaults: list[str]
    #: parameters left unset whose meaning is a rule (``epsilon``): name -> the rule
    unset: dict[str, str] = field(default_factory=dict)
    score_files: list[ScoreFileRecord] = field(default_factory=list)
    #: the device the merge ran on (mergekit's ``--device`` / ``--cuda``)
    device: str = "cpu"

    def rerun_command(self) -> str:
        return f"mergekit-yaml mergekit_config.yml OUTPUT --random-seed {self.seed}"


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "?"
    return found


#: parameters whose unset value means a rule, and the rule, for the record
UNSET_RULES = {
    "epsilon": "min(0.1, density/2, (1 - density)/2), per model and tensor",
}


def record(
    merge_config, method_spec, seed: int, seed_drawn: bool, device: str = "cpu"
) -> Provenance:
    """The provenance of a merge of ``merge_config`` by the method ``method_spec``
    (mergekit's ``MergeMethodSpec``) with ``seed``, on ``device``."""
    given = dict(merge_config.parameters or {})
    parameters, defaults, unset = {}, [], {}
    for spec in method_spec.parameters:
        if spec.name in given:
            parameters[spec.name] = given[spec.name]
        elif spec.required:
            continue
        elif spec.default is None:
            if spec.name in UNSET_RULES:
                unset[spec.name] = UNSET_RULES[spec.name]
        else:
            parameters[spec.name] = spec.default
            defaults.append(spec.name)
    return Provenance(
        method=method_spec.name,
        seed=seed,
        seed_drawn=seed_drawn,
        versions=versions(),
        parameters=parameters,
        defaults=defaults,
        unset=unset,
        score_files=score_file_records(merge_config),
        device=device,
    )


def score_file_records(merge_config) -> list[ScoreFileRecord]:
    """Every ``lrp_scores`` value of the config (filters included), with what the file
    says about itself."""
    records = []
    seen = set()
    for _, model, parameters in parameter_places(merge_config):
        for value in setting_values(parameters.get("lrp_scores")):
            if not value or (str(model), str(value)) in seen:
                continue
            seen.add((str(model), str(value)))
            who = str(model) if model is not None else "every model"
            try:
                meta = open_scores(str(value)).metadata
            except ScoreFileError:
                records.append(ScoreFileRecord(who, str(value)))
                continue
            records.append(
                ScoreFileRecord(
                    who,
                    str(value),
                    meta.method,
                    meta.quantity,
                    meta.target,
                    str(meta.num_prompts),
                    meta.model_fingerprint,
                )
            )
    return records


def saved_config(merge_config, config_source: str | None, provenance: Provenance) -> str:
    """The output's ``mergekit_config.yml``: a header saying how to reproduce the merge,
    then the config with every default the method used written out."""
    config = yaml.safe_load(config_source) if config_source else None
    if not isinstance(config, dict):
        config = yaml.safe_load(merge_config.to_yaml())
    given = dict(config.get("parameters") or {})
    config["parameters"] = {
        **{name: provenance.parameters[name] for name in provenance.defaults},
        **given,
    }
    return header(provenance) + yaml.safe_dump(config, sort_keys=False)


def header(provenance: Provenance) -> str:
    versions_text = ", ".join(f"{name} {v}" for name, v in provenance.versions.items())
    lines = [
        f"Merged with {provenance.method} by {versions_text}.",
        f"Reproduce these weights: {provenance.rerun_command()}",
    ]
    if provenance.seed_drawn:
        lines.append("  (no --random-seed was given; this seed was drawn for the merge)")
    if provenance.defaults:
        lines.append(
            f"{provenance.method}'s defaults are written out below: "
            + ", ".join(provenance.defaults)
        )
    for name, rule in provenance.unset.items():
        lines.append(f"{name} unset: {rule}")
    if provenance.score_files:
        lines.append("Score files (model: file, signal, quantity, target, prompts, fingerprint):")
        for r in provenance.score_files:
            lines.append(
                f"  {r.model}: {r.path}, {r.method}, {r.quantity}, {r.target}, "
                f"{r.prompts} prompts, {r.fingerprint[:16]}"
            )
    return "".join(f"# {line}\n" for line in lines)
