"""Check an ``lrp``, ``circuit`` or ``regmean`` merge before any tensor is merged or written.

The check plans the merge with mergekit's own planner (cheap: no tensor is read),
then inspects exactly what each planned tensor will ask for: per-model weight and
density after filters, the score file's format, its fingerprint against the
model's checkpoint, and the presence, shape and dtype of every score tensor (or Gram
matrix) the kernel will read. A 70B merge thus fails in seconds, naming the culprit,
rather than at tensor 900 of 1000. Only NaN/Inf inside score tensors and a singular Gram
matrix are left to merge time (finding them means reading every byte, or solving); the
staged output directory guarantees nothing half-written is left behind when that
happens.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from mergekit_lrp.merging.methods import METHODS, spec_of
from mergekit_lrp.merging.parameters import LRPConfigError, parameter_places
from mergekit_lrp.merging.staging import check_output_folder
from mergekit_lrp.merging.tensor_names import is_vocabulary_tensor
from mergekit_lrp.merging.tensor_scores import open_scores
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scores.fingerprint import fingerprint_tensors


@dataclass
class _ModelFiles:
    tensor_files: dict[str, str]
    model_type: str | None
    fingerprint: str = ""
    score_paths_seen: set[str] = field(default_factory=set)
    #: for ``base+adapter``: the (base, adapter) folders, fingerprinted together
    adapter_parts: tuple[str, str] | None = None

    #: file -> {tensor name: shape}, each file's header read once
    _shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.tensor_files[name]
        if file not in self._shapes:
            with safe_open(file, framework="pt") as handle:
                self._shapes[file] = {
                    key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()
                }
        return self._shapes[file][name]


def index_tensor_files(index) -> dict[str, str]:
    """Tensor name -> safetensors file, from mergekit's ``ShardedTensorIndex``."""
    from mergekit_lrp.scores.fingerprint import FingerprintError

    if not index.is_safetensors:
        raise FingerprintError(
            f"{index.base_path}: checkpoint is not stored as safetensors; mergekit-lrp never "
            "unpickles weights. Convert it first (load and save_pretrained)."
        )
    return {name: os.path.join(index.base_path, file) for name, file in index.tensor_paths.items()}


def plan_merge(merge_config, options):
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


#: parameter names of earlier lrp merge implementations, and their names here
FORMER_NAMES = {"lrp_path": "lrp_scores"}


def check_parameter_names(merge_config, method) -> None:
    """Refuse parameters the registered merge ``method`` does not take (mergekit ignores
    them silently)."""
    method_name = method.spec.name
    known = [parameter.name for parameter in method.spec.parameters]
    for where, _, parameters in parameter_places(merge_config):
        for name in parameters:
            if name in known:
                continue
            if name in FORMER_NAMES:
                raise LRPConfigError(
                    f"{method_name}: {name!r} ({where}) is called {FORMER_NAMES[name]!r} in "
                    "mergekit-lrp"
                )
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            owners = _methods_taking(name, method_name)
            if owners:
                hint = f"it is a parameter of {' and '.join(owners)}, not {method_name}; " + hint
            raise LRPConfigError(
                f"{method_name}: unknown parameter {name!r} ({where}); {hint}{method_name} "
                f"takes: {', '.join(known)}"
            )


def _methods_taking(name: str, besides: str) -> list[str]:
    """This project's other merge methods that take a parameter called ``name``."""
    return [
        spec.name
        for spec in METHODS.values()
        if spec.name != besides and name in {p.name for p in spec.registered().spec.parameters}
    ]


@dataclass
class PlannedInput:
    """One model's input to one planned tensor, as the method's ``check_tensor`` sees it."""

    model: object
    #: the model's resolved per-model parameters for this tensor
    parameters: dict
    files: _ModelFiles
    #: the shape mergekit will load the tensor with from this model
    shape: tuple[int, ...]

    def score_file(self, path) -> ScoreReader | None:
        """The model's score file at ``path``, fingerprint-checked (once per file)."""
        return _check_file(self.model, path, self.files)


def check_merge(merge_config, options, out_path=None) -> None:
    """Everything checked before a merge with one of this project's methods: the setup
    (base model, dtypes, device, LoRA cache, output folder), then one pass over the merge
    plan in which the method's spec (:mod:`.methods`) checks its settings, each model's
    values and every tensor's inputs."""
    check_setup(merge_config, options, out_path)
    method = spec_of(merge_config.merge_method)
    check_parameter_names(merge_config, METHODS[method.NAME].registered())
    models: dict = {}
    for weight, task in plan_merge(merge_config, options):
        settings = method.settings_of(task.parameters)
        if not method.reads_files(settings):
            continue
        inputs, base = [], None
        for model, input_weight in _input_weights(task).items():
            if model == task.base_model:
                files = _model_files(model, models, options)
                base = PlannedInput(model, {}, files, _weight_shape(input_weight, files))
                continue
            parameters = task.input_parameters[model]
            method.check_model(settings, model, parameters)
            files = _model_files(model, models, options)
            shape = _weight_shape(input_weight, files)
            if shape is None:
                continue  # an optional tensor this model lacks: base passthrough
            _refuse_moved_tensor(method.NAME, model, input_weight, weight)
            inputs.append(PlannedInput(model, parameters, files, shape))
        method.check_tensor(settings, weight, inputs, base)
    _check_extra_tensors(models)


#: dtype names mergekit's ``dtype`` / ``out_dtype`` accept, by what they are
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_setup(merge_config, options, out_path=None) -> None:
    """What mergekit itself would only trip over after loading (or merging) everything."""
    method = merge_config.merge_method
    bases = [merge_config.base_model] + [s.base_model for s in merge_config.slices or ()]
    if not any(bases):
        raise LRPConfigError(
            f"{method} needs base_model: the model the fine-tunes' task vectors are taken "
            "from (add `base_model: path/to/base` to the config)"
        )
    for option in ("dtype", "out_dtype"):
        value = getattr(merge_config, option, None)
        if value is not None and str(value).removeprefix("torch.") not in DTYPE_NAMES:
            raise LRPConfigError(
                f"{option}: {value!r} is not a dtype mergekit knows; use one of "
                f"{', '.join(DTYPE_NAMES)}"
            )
    device = str(getattr(options, "device", "cpu") or "cpu")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LRPConfigError(
                "--cuda was given, but torch sees no CUDA device on this machine; merge "
                "without --cuda (on the CPU)"
            )
    for model in merge_config.referenced_models():
        folder = model.model.path
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
            raise LRPConfigError(
                f"model {model}: {os.path.join(folder, 'config.json')} does not exist; a model "
                "folder needs the config.json that save_pretrained writes beside its weights"
            )
    adapters = [str(m) for m in merge_config.referenced_models() if m.lora is not None]
    if adapters and not getattr(options, "lora_merge_cache", None):
        raise LRPConfigError(
            f"model {adapters[0]} is a LoRA adapter over a base model; mergekit merges the "
            "adapter into its base first and needs a folder for that: pass "
            "--lora-merge-cache DIR"
        )
    if out_path is not None:
        check_output_folder(out_path)


def _model_files(model, models: dict, options) -> _ModelFiles:
    """The model's tensor files and type, read once per preflight into ``models``."""
    from mergekit.io.tasks import LoaderCache

    if model not in models:
        index = LoaderCache().get(model).index
        model_type = model.config(trust_remote_code=options.trust_remote_code).model_type
        parts = None
        if model.lora is not None:
            parts = (_local_folder(model.model), _local_folder(model.lora))
        models[model] = _ModelFiles(index_tensor_files(index), model_type, adapter_parts=parts)
    return models[model]


def _local_folder(path) -> str:
    """A local folder for mergekit's ``ModelPath`` (fetched from the hub when not local)."""
    if os.path.isdir(path.path):
        return path.path
    from huggingface_hub import snapshot_download

    return snapshot_download(path.path, revision=path.revision)


def _refuse_moved_tensor(method: str, model, input_weight, weight) -> None:
    if input_weight.name == weight.name:
        return
    raise LRPConfigError(
        f"{method}: model {model} feeds its tensor {input_weight.name!r} into output "
        f"{weight.name!r} (a slice moves its layers). {method} cannot merge that with score "
        "files: scores are looked up by the output tensor's name, so the merge would "
        f"rank {input_weight.name!r} by the relevance of that model's "
        f"{weight.name!r}, measured at another position. Either build the "
        "rearranged model first (a passthrough merge with these slices), score "
        "it with lrp-compute and merge that, or merge the moved layers with "
        "a method without scores (slerp, linear, ties)"
    )


def _weight_shape(weight, files: _ModelFiles) -> tuple[int, ...] | None:
    """The shape mergekit will load ``weight`` with from this model, or None if absent:
    stored under its name or an alias, or assembled by transformers' conversion."""
    from mergekit.architecture.conversion import (
        can_convert_checkpoint_keys,
        convert_checkpoint_tensors,
    )

    for name in (weight.name, *(weight.aliases or ()), *(weight.tied_names or ())):
        if name in files.tensor_files:
            return files.shape(name)
    names = set(files.tensor_files)
    if not can_convert_checkpoint_keys(files.model_type, names, weight.name):
        return None
    sources = {
        n: (lambda n=n: torch.empty(files.shape(n), device="meta")) for n in files.tensor_files
    }
    assembled = convert_checkpoint_tensors(files.model_type, sources, weight.name)
    return None if assembled is None else tuple(assembled.shape)


def _check_file(model, path, files: _ModelFiles) -> ScoreReader | None:
    """Open and fingerprint-check a model's score file once."""
    if not path:
        return None
    reader = open_scores(str(path))
    if str(path) in files.score_paths_seen:
        return reader
    if not files.fingerprint:
        files.fingerprint = fingerprint_tensors(files.tensor_files)
    found = reader.metadata.model_fingerprint
    if found != files.fingerprint and found != _adapter_identity(files):
        raise ScoreFileError(
            f"{path}: computed on a different checkpoint than model {model} (fingerprint "
            f"{reader.metadata.model_fingerprint[:12]}…, the model's is {files.fingerprint[:12]}…)."
            f" Recompute it with `lrp-compute {model} ...`"
        )
    files.score_paths_seen.add(str(path))
    return reader


def _adapter_identity(files: _ModelFiles) -> str | None:
    """The fingerprint ``lrp-compute BASE+ADAPTER`` writes: of the base and the adapter,
    whatever dtype mergekit merged the adapter in (None for a plain checkpoint)."""
    if files.adapter_parts is None:
        return None
    from mergekit_lrp.scores.fingerprint import adapter_fingerprint, checkpoint_tensor_files

    base, adapter = files.adapter_parts
    return adapter_fingerprint(fingerprint_tensors(checkpoint_tensor_files(base)), adapter)


def _check_extra_tensors(models: dict[object, _ModelFiles]) -> None:
    """Refuse a score file holding tensors its model does not have (for a Gram file: Gram
    matrices of weights it does not have; a tied output head, which the checkpoint stores
    as its embedding, excepted)."""
    for model, files in models.items():
        for path in files.score_paths_seen:
            reader = open_scores(path)
            if reader.is_gram:
                names = {n for n in reader.metadata.gram_of if not is_vocabulary_tensor(n)}
            else:
                names = reader.names()
            extra = sorted(names - set(files.tensor_files))
            if extra:
                shown = ", ".join(repr(n) for n in extra[:5])
                raise ScoreFileError(
                    f"{path}: holds {len(extra)} tensor(s) that model {model} does not have "
                    f"({shown}); the file does not belong to this checkpoint"
                )
