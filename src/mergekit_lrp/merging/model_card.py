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
    describe = {"circuit": _describe_circuit, "regmean": _describe_regmean}.get(
        provenance.method, _describe_lrp
    )
    lines = [
        "",
        f"## How the weights were chosen (`{provenance.method}`, mergekit-lrp)",
        "",
        f"This model was merged with the `{provenance.method}` method of mergekit-lrp, a "
        "mergekit plugin; reproducing the merge needs it installed beside mergekit.",
        "",
        describe(merge_config, provenance),
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


def _values(merge_config, provenance: Provenance, name: str) -> list:
    """Every value ``name`` takes in the config (each model's and filter's), else the
    resolved global one."""
    found = []
    for _, _, parameters in parameter_places(merge_config):
        if name in parameters:
            found += setting_values(parameters[name])
    if name not in (merge_config.parameters or {}) and name in provenance.parameters:
        found.append(provenance.parameters[name])
    return list(dict.fromkeys(found))


def _one(values: list, what: str) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"each model's own {what}"


def _signals(provenance: Provenance) -> str:
    names = sorted({SIGNAL_NAMES.get(r.method, r.method) for r in provenance.score_files})
    return " / ".join(names) if names else "|Δ| (no score files: magnitude)"


def _describe_lrp(merge_config, provenance: Provenance) -> str:
    p = provenance.parameters
    density = _one(_values(merge_config, provenance, "density"), "`density`")
    importance = {
        "delta": f"the size of the change weighted by {_signals(provenance)}",
        "weight": f"the size of the fine-tuned weight weighted by {_signals(provenance)}",
        "scores": f"{_signals(provenance)} alone",
    }.get(str(p.get("importance")), str(p.get("importance")))
    if p.get("selection") == "stochastic":
        spread = "`epsilon`" if "epsilon" in p else "the default spread ε"
        chosen = (
            f"; each entry was kept with a probability that rises with its rank, {density} "
            f"on average (± {spread}), and divided by that probability (the draw seeded by "
            f"seed {provenance.seed})"
        )
    else:
        chosen = f" and kept the {density} of its entries of highest importance"
        if p.get("rescale") is True:
            chosen += ", divided by the density"
        elif p.get("rescale") == "mass":
            chosen += ", divided by the kept share of importance mass"
    budget = {
        "layer": " (the density holds per layer, shared among its tensors by score mass)",
        "model": " (the density holds for the whole model, shared by score mass)",
    }.get(str(p.get("budget")), "")
    protect = (
        " Norms, biases, embeddings and output heads were kept whole."
        if p.get("protect_special")
        else ""
    )
    consensus = {
        "priority": "Where kept entries of several fine-tunes disagree in sign, the "
        "first-listed fine-tune that kept the entry wins and those agreeing with it stay.",
        "none": "The fine-tunes' kept entries were added.",
        "sum": "Where they disagree in sign, TIES' sign election (by summed values) decides.",
        "count": "Where they disagree in sign, TIES' sign election (by count) decides.",
        "relevance": "Where they disagree in sign, the sign of the importance-weighted sum "
        "wins.",
        "winner": "Where they disagree in sign, only the most important entry stays.",
        "drop": "Where they disagree in sign, the entry is dropped.",
        "unit": "Where they disagree in sign, in each output row the fine-tune with the most "
        "mass there wins and those agreeing with it stay.",
    }.get(str(p.get("consensus")), "")
    normalize = (
        " Each entry was divided by the summed weights of the fine-tunes that kept it "
        "(agreeing entries averaged)."
        if p.get("normalize")
        else " The weighted entries were added to the base."
    )
    return (
        f"Each fine-tune's task vector (its weights minus the base's) was ranked by "
        f"{importance}{budget}{chosen}.{protect} {consensus}{normalize}"
    )


def _describe_circuit(merge_config, provenance: Provenance) -> str:
    p = provenance.parameters
    order = (
        "by the size of the change weighted by " + _signals(provenance)
        if p.get("drop_order") == "scores"
        else "by the size of the change"
    )
    rescale = ", divided by their keep probability" if p.get("rescale") else ""
    return (
        "The models were merged in priority order, the first listed highest. Each model's "
        f"changes of at least {p.get('meaningful_change_threshold')} were kept at a rate "
        f"that falls with priority (base drop rate {p.get('base_droprate')}, temperature "
        f"{p.get('temperature')}), drawn by rank {order} (spread {p.get('epsilon')}; seed "
        f"{provenance.seed}){rescale}. Where models disagree in sign, the higher priority "
        "wins; agreeing changes are blended."
    )


def _describe_regmean(merge_config, provenance: Provenance) -> str:
    p = provenance.parameters
    alpha, ridge = p.get("alpha"), p.get("ridge")
    other = {
        "average": "the weighted average of the fine-tunes",
        "task_arithmetic": "task arithmetic (the base plus the weighted sum of the "
        "fine-tunes' changes)",
    }.get(str(p.get("other_tensors")), str(p.get("other_tensors")))
    weights = _values(merge_config, provenance, "weight")
    weighted = "" if weights == [1.0] else ", each scaled by its model's `weight`"
    missing = (
        " Linear weights a Gram file lacked were merged like the other tensors."
        if p.get("missing_scores") == "other_tensors"
        else ""
    )
    from mergekit_lrp.merging.gram import resolve_dtype

    solve_dtype = str(p.get("solve_dtype"))
    dtype = str(resolve_dtype(solve_dtype, provenance.device)).removeprefix("torch.")
    if solve_dtype == "auto":
        dtype += f" (`solve_dtype: auto` on {provenance.device})"
    return (
        "Each linear layer was solved in closed form (RegMean) as the weight whose outputs "
        "best fit every fine-tune's outputs on its own calibration inputs: the fine-tunes' "
        "changes weighted by the Gram matrices of their layer inputs (from `lrp-compute "
        f"--method gram`){weighted}, off-diagonal entries scaled by alpha = {alpha}, with "
        f"a ridge of {ridge} times the mean diagonal pulling the change towards the base, "
        f"solved in {dtype}. The other tensors (embeddings, norms, biases) are {other}."
        f"{missing}"
    )
