"""The merge methods' parameter choices and the checks they share, without mergekit.

Each method's settings class (:mod:`.methods`) owns its defaults and checks its values
with these functions, and the kernels, the pre-merge check (:mod:`.preflight`), the
notebook API and ``lrp-inspect`` all go through those classes, so a bad value is refused
with the same message wherever it is given. The checks exist because mergekit's own
messages would not name the option or the model (pydantic names the type, not the
parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator

from mergekit_lrp.errors import LrpError

#: what ranks a task vector's entries (docs/method.md, step 2)
IMPORTANCE_MODES = ("delta", "weight", "scores")
#: how the kept entries of several models combine (step 4)
CONSENSUS_MODES = ("none", "sum", "count", "relevance", "winner", "drop", "priority", "unit")
#: what ranks the models on a unit for ``consensus: unit``
UNIT_MASSES = ("importance", "magnitude")
#: how a tensor's kept entries are chosen (step 3)
SELECTION_MODES = ("topk", "stochastic")
RESCALE_MODES = (False, True, "mass")
#: what happens where a model has no scores for a tensor
MISSING_SCORES_MODES = ("error", "magnitude", "base")
#: where ``density`` applies: each tensor, each layer, or the whole model
BUDGETS = ("tensor", "layer", "model")
#: what orders ``circuit``'s drops
DROP_ORDERS = ("magnitude", "scores")
#: how ``regmean`` merges the tensors it does not solve for (embeddings, norms, biases)
OTHER_TENSOR_RULES = ("average", "task_arithmetic")
#: what ``regmean`` does with a linear weight a model's Gram file lacks
REGMEAN_MISSING_MODES = ("error", "other_tensors")
#: the dtype of ``regmean``'s solve; ``auto``: float64 on a CPU, float32 on a GPU
SOLVE_DTYPES = ("auto", "float64", "float32")

class LRPConfigError(LrpError):
    """A merge parameter is out of range or a model has no usable scores."""


def check_choice(method: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise LRPConfigError(f"{method}: {name} must be one of {shown}; got {value!r}")


def check_model_parameters(
    model: Hashable,
    weight: float,
    density: float,
    epsilon: float | None = None,
    method: str = "lrp",
) -> None:
    """Per-model values. ``epsilon`` is checked when the selection is stochastic and it
    was given (unset, it is narrowed to fit: :func:`.selection.default_epsilon`)."""
    check_density(density, f"for {model}", method)
    if weight < 0:
        raise LRPConfigError(f"{method}: weight for {model} must not be negative, got {weight}")
    if epsilon is not None and not (
        epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1
    ):
        raise LRPConfigError(
            f"{method}: with selection: stochastic, density ± epsilon for {model} must stay in "
            f"(0, 1]; got density {density}, epsilon {epsilon}"
        )


def check_density(density: float, where: str = "", method: str = "lrp") -> None:
    if not 0 < density <= 1:
        where = f" {where}" if where else ""
        raise LRPConfigError(f"{method}: density{where} must be in (0, 1], got {density}")


def check_base_weight(method: str, base_scores: str | None, base_weight: float) -> None:
    """``base_weight`` weighs the base's own file (``base_scores``): positive, and only
    with that file."""
    if not base_weight > 0:  # also refuses NaN
        raise LRPConfigError(
            f"{method}: base_weight must be positive, got {base_weight} (it weighs the "
            "base's own scores; drop base_scores to leave the base out)"
        )
    if base_weight != 1.0 and base_scores is None:
        raise LRPConfigError(
            f"{method}: base_weight weighs the base's own scores, but no base_scores is "
            "given: add `base_scores: base.safetensors` (lrp-compute on the base model with "
            "general prompts) or drop base_weight"
        )


def base_member(base) -> str:
    """How errors name the base's own score file (``base_scores``)."""
    return f"{base} (base_scores)"


def settings_from(settings_class: type, parameters: dict):
    """An instance of a method's (dataclass) settings class from mergekit's resolved
    global parameters of one tensor, checked by the class; absent ones at its defaults."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    return settings_class(**{name: parameters[name] for name in names if name in parameters})


def score_path(value) -> str | None:
    """One model's resolved ``lrp_scores`` value as a path, or None when it has none."""
    return str(value) if value else None


def parameter_places(merge_config) -> Iterator[tuple[str, object, dict]]:
    """(where, model or None, parameters) for every parameter block of a merge config:
    the global one, each model's and each slice source's (modules included)."""
    yield "parameters", None, dict(merge_config.parameters or {})
    yield from _places_in(merge_config)
    for name, module in (merge_config.modules or {}).items():
        yield f"parameters of module {name}", None, dict(module.parameters or {})
        yield from _places_in(module)


def _places_in(definition) -> Iterator[tuple[str, object, dict]]:
    for model in definition.models or ():
        yield f"parameters of {model.model}", model.model, dict(model.parameters or {})
    for output_slice in definition.slices or ():
        yield "parameters of a slice", None, dict(output_slice.parameters or {})
        for source in output_slice.sources:
            yield f"parameters of {source.model}", source.model, dict(source.parameters or {})


def setting_values(setting) -> list:
    """The values a parameter setting can take: a scalar, or each value of mergekit's
    ``filter:`` list (dicts or ``ConditionalParameter`` objects)."""
    items = setting if isinstance(setting, list) else [setting]
    values = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("value")
        elif hasattr(item, "value") and hasattr(item, "filter"):
            item = item.value
        values.append(item)
    return values
