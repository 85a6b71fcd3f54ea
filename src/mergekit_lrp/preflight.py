"""Check an ``lrp`` merge before any tensor is merged or written.

The check plans the merge with mergekit's own planner (cheap: no tensor is read),
then inspects exactly what each planned tensor will ask for: per-model weight and
density after filters, the score file's format, its fingerprint against the
model's checkpoint, and the presence, shape and dtype of every score tensor the
kernel will read. A 70B merge thus fails in seconds, naming the culprit, rather
than at tensor 900 of 1000. Only NaN/Inf inside score tensors is left to merge
time (finding it means reading every score byte); the staged output directory
guarantees nothing half-written is left behind when that happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safetensors import safe_open

from mergekit_lrp.fingerprint import fingerprint_tensors, index_tensor_files
from mergekit_lrp.method import (
    LRPConfigError,
    check_model_parameters,
    check_shared_parameters,
    open_scores,
)
from mergekit_lrp.score_file import SCORE_DTYPES, ScoreFileError, ScoreReader


@dataclass
class _ModelFiles:
    tensor_files: dict[str, str]
    fingerprint: str = ""
    score_paths_seen: set[str] = field(default_factory=set)


def plan_lrp_merge(merge_config, options):
    """Plan (without executing) the merge, as ``run_merge`` would: (weight, task) pairs.

    mergekit 0.1.5's ``plan_in_memory`` fails validating its own ReturnTensor
    tasks, so the planner's ``_plan`` is called and its task list read directly.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = merge_config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    planner._plan()
    return planner._tensors


def _input_weights(task):
    from mergekit.io.tasks import GatherTensors

    gather = task.gather_tensors
    while not isinstance(gather, GatherTensors):
        gather = gather.gather_tensors
    return gather.weight_info


def preflight(merge_config, options) -> None:
    """Raise :class:`LRPConfigError` / :class:`ScoreFileError` naming what is wrong."""
    from mergekit.io.tasks import LoaderCache

    targets = plan_lrp_merge(merge_config, options)
    models: dict = {}
    checked_shared = False
    for weight, task in targets:
        if not checked_shared:
            check_shared_parameters(
                task.parameters["importance"],
                task.parameters["consensus"],
                task.parameters["missing_scores"],
            )
            checked_shared = True
        shared = task.parameters
        for model, input_weight in _input_weights(task).items():
            if model == task.base_model:
                continue
            params = task.input_parameters[model]
            check_model_parameters(model, params["weight"], params["density"])
            if model not in models:
                index = LoaderCache().get(model).index
                models[model] = _ModelFiles(index_tensor_files(index))
            files = models[model]
            stored = _stored_name(input_weight, files.tensor_files)
            if stored is None:
                continue  # an optional tensor this model lacks: base passthrough
            if input_weight.name != weight.name:
                raise LRPConfigError(
                    f"lrp: model {model} feeds its tensor {input_weight.name!r} into output "
                    f"{weight.name!r}; lrp scores are looked up by tensor name, so slices that "
                    "shift layers are not supported"
                )
            with safe_open(files.tensor_files[stored], framework="pt") as handle:
                shape = tuple(handle.get_slice(stored).get_shape())
            protected = shared["protect_special"] and (
                len(shape) < 2 or weight.vocabulary_axis is not None
            )
            if protected or params["density"] >= 1:
                _check_file(model, params["lrp_scores"], files)
                continue
            _check_tensor(model, weight.name, shape, params["lrp_scores"], shared, files)
    for model, files in models.items():
        for path in files.score_paths_seen:
            _check_extra_tensors(model, path, files)


def _stored_name(weight, tensor_files) -> str | None:
    for name in (weight.name, *(weight.aliases or ()), *(weight.tied_names or ())):
        if name in tensor_files:
            return name
    return None


def _check_file(model, path, files: _ModelFiles) -> ScoreReader | None:
    """Open and fingerprint-check a model's score file once."""
    if not path:
        return None
    reader = open_scores(str(path))
    if str(path) in files.score_paths_seen:
        return reader
    if not files.fingerprint:
        files.fingerprint = fingerprint_tensors(files.tensor_files)
    if reader.metadata.model_fingerprint != files.fingerprint:
        raise ScoreFileError(
            f"{path}: computed on a different checkpoint than model {model} (fingerprint "
            f"{reader.metadata.model_fingerprint[:12]}…, the model's is {files.fingerprint[:12]}…)."
            " Recompute it with lrp-compute on this model"
        )
    files.score_paths_seen.add(str(path))
    return reader


def _check_tensor(model, name, shape, path, shared, files: _ModelFiles) -> None:
    reader = _check_file(model, path, files)
    missing = shared["missing_scores"]
    if reader is None:
        if missing == "error":
            raise LRPConfigError(
                f"lrp: model {model} has no lrp_scores. Add `lrp_scores: path.safetensors` to its "
                "parameters (compute it with lrp-compute), or set missing_scores: magnitude|base"
            )
        return
    if reader.resolve(name) is None:
        if missing == "error":
            raise ScoreFileError(
                f"{path}: no scores for tensor {name!r} (model {model}); set missing_scores: "
                "base or magnitude to merge it without relevance"
            )
        return
    if reader.shape(name) != shape:
        raise ScoreFileError(
            f"{path}: scores for {name!r} have shape {reader.shape(name)}, but model {model} "
            f"has shape {shape}"
        )
    if reader.dtype_name(name) not in SCORE_DTYPES:
        raise ScoreFileError(
            f"{path}: scores for {name!r} are {reader.dtype_name(name)}; expected F32 or BF16"
        )


def _check_extra_tensors(model, path: str, files: _ModelFiles) -> None:
    extra = sorted(open_scores(path).names() - set(files.tensor_files))
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5])
        raise ScoreFileError(
            f"{path}: holds {len(extra)} tensor(s) that model {model} does not have ({shown}); "
            "the file does not belong to this checkpoint"
        )
