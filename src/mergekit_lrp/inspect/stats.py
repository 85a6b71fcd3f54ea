"""The numbers ``lrp-inspect`` shows: a score file's summary, what the ``lrp`` merge
would keep of a task vector, and how two score files agree.

Every mask of a task vector here is the one the merge applies at the given settings
(:func:`mergekit_lrp.merging.masks.kept_mask`: the kernel's own reading of the tensor,
importance, budget and seeded draw, and its selection rule). Embeddings and output heads
are recognised by name here, where the merge asks mergekit's architecture. Results are
plain dicts and lists (what ``--json`` prints).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.masks import MaskSettings, kept_mask
from mergekit_lrp.merging.selection import kept_count, top_k_mask
from mergekit_lrp.merging.tensor_names import KINDS, layer_index, module_kind
from mergekit_lrp.merging.tensor_scores import TensorScores
from mergekit_lrp.scores.file import GRAM_QUANTITIES, ScoreReader
from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files, model_fingerprint


class InspectError(LrpError):
    """Bad input to lrp-inspect: a score file paired with the wrong model, a bad option."""


class Checkpoint:
    """Read-only access to the tensors of a local safetensors checkpoint, one at a time."""

    def __init__(self, model_dir: str | os.PathLike):
        self.path = Path(model_dir)
        self.files = checkpoint_tensor_files(self.path)

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def check_pairing(reader: ScoreReader, model_dir: str | os.PathLike) -> str:
    """The model's fingerprint; :class:`InspectError` unless the file was computed on it."""
    found = model_fingerprint(model_dir)
    if reader.metadata.model_fingerprint != found:
        raise InspectError(
            f"{reader.path} was not computed on {model_dir} (the file's fingerprint "
            f"{reader.metadata.model_fingerprint[:12]}…, the model's {found[:12]}…); "
            "pair each score file with the model it was computed on, in the same order"
        )
    return found


def _sorted_layers(keys: Iterable[int | None]) -> list[int | None]:
    """Layers in order, tensors outside any layer (None) last."""
    keys = set(keys)
    return sorted(k for k in keys if k is not None) + ([None] if None in keys else [])


# ---------------------------------------------------------------- one score file


def _file_summary(reader: ScoreReader, model_dir) -> dict:
    """What every file's summary starts with: its metadata, and the model it was paired
    with (the pairing checked first) when ``model_dir`` is given."""
    meta = reader.metadata
    if model_dir is not None:
        check_pairing(reader, model_dir)
    return {
        "path": str(reader.path),
        "quantity": meta.quantity,
        "target": meta.target,
        "prompts": meta.num_prompts,
        "tokens": meta.num_tokens,
        "model_type": meta.model_type,
        "method": meta.method,
        "generator": meta.generator,
        "fingerprint": meta.model_fingerprint,
        "model": None if model_dir is None else str(model_dir),
        "unscored": None,
    }


def summarize(reader: ScoreReader, model_dir: str | os.PathLike | None = None) -> dict:
    """Metadata, per-kind and per-layer score totals of one file; with ``model_dir`` the
    pairing is checked first and the checkpoint's tensors without scores are listed.

    A total is the sum of the stored scores (mean |d target / d theta| per entry) over
    the tensors of that kind: the file's relevance mass, before any task vector.
    """
    summary = _file_summary(reader, model_dir)
    kinds = {kind: {"tensors": 0, "entries": 0, "total": 0.0} for kind in KINDS}
    layers: dict[int | None, dict[str, float]] = defaultdict(lambda: dict.fromkeys(KINDS, 0.0))
    for name in sorted(reader.names()):
        values = reader.get(name)
        kind = module_kind(name)
        total = float(values.double().sum())
        kinds[kind]["tensors"] += 1
        kinds[kind]["entries"] += values.numel()
        kinds[kind]["total"] += total
        layers[layer_index(name)][kind] += total
    grand = sum(k["total"] for k in kinds.values())
    for entry in kinds.values():
        entry["share"] = entry["total"] / grand if grand > 0 else 0.0
    summary["kinds"] = kinds
    summary["total"] = grand
    summary["tensors"] = sum(k["tensors"] for k in kinds.values())
    summary["layers"] = [{"layer": key, **layers[key]} for key in _sorted_layers(layers)]
    if model_dir is not None:
        checkpoint = Checkpoint(model_dir)
        summary["unscored"] = sorted(n for n in checkpoint.names() if reader.resolve(n) is None)
    return summary


# ---------------------------------------------------------------- a Gram file

#: a Gram matrix whose condition number exceeds this is called ill-conditioned: a float32
#: solve with it keeps about 7 - log10(condition) significant digits, none past 1e7
ILL_CONDITIONED = 1e6


def is_gram_file(reader: ScoreReader) -> bool:
    """True for a file of Gram matrices (``lrp-compute --method gram``), not scores."""
    return reader.metadata.quantity in GRAM_QUANTITIES


def summarize_gram(reader: ScoreReader, model_dir: str | os.PathLike | None = None) -> dict:
    """Metadata, size and one row per Gram matrix of a Gram file: its layer, width, trace,
    extreme eigenvalues (``eigvalsh`` in float64), condition number (None when the
    smallest eigenvalue is not positive: the matrix is singular) and the weights sharing
    it; with ``model_dir`` the pairing is checked and the checkpoint's matrices without a
    Gram matrix are listed.

    The matrices are read with :meth:`ScoreReader.gram` (a factored one rebuilt from its
    factor and diagonal; ``rank`` and ``error_bound`` say what it holds), not with
    :meth:`ScoreReader.get`, which checks scores: those are never negative, and a Gram
    matrix's off-diagonal entries are.
    """
    meta = reader.metadata
    summary = {
        **_file_summary(reader, model_dir),
        "kind": "gram",
        "token_weighting": meta.extra.get("token_weighting"),
    }
    readers_of: dict[str, list[str]] = defaultdict(list)
    for weight, stored in meta.gram_of.items():
        readers_of[stored].append(weight)
    rows = []
    names = sorted(readers_of, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
    for name in names:
        gram = reader.gram(readers_of[name][0]).double()  # factored ones: F F^T + diag(d)
        eigenvalues = torch.linalg.eigvalsh(gram)
        low, high = float(eigenvalues[0]), float(eigenvalues[-1])
        condition = high / low if low > 0 else None
        form = meta.gram_factored.get(name)
        rows.append(
            {
                "name": name,
                "layer": layer_index(name),
                "size": gram.shape[0],
                "rank": form["rank"] if form else None,
                "error_bound": form["error"] if form else 0.0,
                "error_estimated": bool(form and form.get("estimated")),
                "trace": float(gram.trace()),
                "min_eigenvalue": low,
                "max_eigenvalue": high,
                "condition": condition,
                "ill_conditioned": condition is None or condition > ILL_CONDITIONED,
                "shared_by": sorted(readers_of.get(name, [])),
            }
        )
    summary["matrices"] = len(rows)
    summary["bytes"] = reader.stored_bytes()
    summary["weights"] = len(meta.gram_of)
    summary["grams"] = rows
    summary["ill_conditioned"] = [row["name"] for row in rows if row["ill_conditioned"]]
    if model_dir is not None:
        checkpoint = Checkpoint(model_dir)
        summary["unscored"] = sorted(n for n in checkpoint.names() if n not in meta.gram_of)
    return summary


# ---------------------------------------------------------------- what lrp would keep


def keep_by_layer(
    reader: ScoreReader,
    base_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    settings: MaskSettings,
    check: bool = True,
) -> dict:
    """Per layer, how the ``lrp`` mask at ``settings`` compares with magnitude top-k.

    For each scored tensor that ``protect_special`` does not keep whole: delta = model -
    base, the merge's mask, and the magnitude mask (top k of |delta|, k the number of
    entries the merge's mask keeps). Per layer (tensors pooled):

    * ``lrp_kept``: fraction of the layer's task vector L1 mass (sum |delta|) lrp keeps;
    * ``magnitude_kept``: the same for magnitude top-k (the most any k entries keep);
    * ``overlap``: Jaccard index of the two masks (entries kept by both / by either).
    """
    if check:
        check_pairing(reader, model_dir)
    base, model = Checkpoint(base_dir), Checkpoint(model_dir)
    sums: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    protected = []
    for name in sorted(reader.names() & model.names() & base.names()):
        theta = model.get(name).float()
        theta_base = base.get(name).float()
        if theta.shape != theta_base.shape:
            raise InspectError(
                f"{name!r} has shape {tuple(theta.shape)} in {model_dir} but "
                f"{tuple(theta_base.shape)} in {base_dir}; --base must be the model's base"
            )
        if settings.keeps_whole(name, theta.ndim):
            protected.append(name)
            continue
        delta = theta - theta_base
        located = _located(model_dir, name, reader)
        lrp = kept_mask(located, theta, delta, settings, str(model_dir))
        k = int(lrp.sum())
        magnitude = top_k_mask(delta.abs(), k)
        size = delta.abs().double()
        row = sums[layer_index(name)]
        row["mass"] += float(size.sum())
        row["lrp"] += float(size[lrp].sum())
        row["magnitude"] += float(size[magnitude].sum())
        row["both"] += int((lrp & magnitude).sum())
        row["either"] += int((lrp | magnitude).sum())
        row["entries"] += delta.numel()
        row["kept"] += k
    layers = []
    for key in _sorted_layers(sums):
        row = sums[key]
        layers.append(
            {
                "layer": key,
                "entries": int(row["entries"]),
                "kept": int(row["kept"]),
                "lrp_kept": _ratio(row["lrp"], row["mass"]),
                "magnitude_kept": _ratio(row["magnitude"], row["mass"]),
                "overlap": _ratio(row["both"], row["either"]),
            }
        )
    return {
        "path": str(reader.path),
        "base": str(base_dir),
        "model": str(model_dir),
        **_settings_report(settings),
        "protected": protected,
        "layers": layers,
    }


def _settings_report(settings: MaskSettings) -> dict:
    report = {
        "density": settings.density,
        "importance": settings.importance,
        "selection": settings.selection,
    }
    if settings.selection == "stochastic":
        report["epsilon"] = settings.epsilon
        report["seed"] = settings.seed
    return report


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


# ---------------------------------------------------------------- two or more files


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """|a ∧ b| / |a ∨ b| of two boolean masks; None when both are empty."""
    either = int((a | b).sum())
    return int((a & b).sum()) / either if either else None


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a flat tensor, tied values sharing their average rank."""
    flat = values.reshape(-1)
    order = torch.argsort(flat, stable=True)
    _, inverse, counts = torch.unique_consecutive(
        flat[order], return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty(flat.numel(), dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two equally long tensors (Pearson's r of their
    average ranks); None when either is constant."""
    if a.numel() != b.numel():
        raise InspectError(f"spearman: {a.numel()} values against {b.numel()}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / norm if norm > 0 else None


def compare_files(
    readers: Sequence[ScoreReader],
    density: float,
    mask_of: Callable[[int, str], torch.Tensor] | None = None,
    masks_from: str = "scores",
) -> dict:
    """Per layer and pair of files, over the tensors every file scores with the same
    shape (a layer's tensors pooled): the Jaccard index of their per-tensor masks, and
    Spearman's rank correlation of their scores.

    ``mask_of(i, name)`` is file i's mask of a tensor: by default the top ``density`` of
    its scores; :func:`merge_masks` gives the masks the merge applies.
    """
    MaskSettings(density=density, selection="topk")  # the density check
    if len(readers) < 2:
        raise InspectError("comparing needs two or more score files")

    def scores(i: int, name: str) -> torch.Tensor:
        return readers[i].get(name)

    def top_of_scores(i: int, name: str) -> torch.Tensor:
        values = scores(i, name)
        return top_k_mask(values, kept_count(density, values.numel()))

    mask_of = mask_of or top_of_scores
    common = set.intersection(*(r.names() for r in readers))
    common = sorted(n for n in common if len({r.shape(n) for r in readers}) == 1)
    if not common:
        raise InspectError(
            "the score files share no tensor of the same name and shape: "
            + ", ".join(str(r.path) for r in readers)
        )
    by_layer: dict[int | None, list[str]] = defaultdict(list)
    for name in common:
        by_layer[layer_index(name)].append(name)
    pairs = [(i, j) for i in range(len(readers)) for j in range(i + 1, len(readers))]
    counts = {p: defaultdict(lambda: [0, 0]) for p in pairs}
    rows = {p: [] for p in pairs}
    for key in _sorted_layers(by_layer):
        values = [[] for _ in readers]
        masks = [[] for _ in readers]
        for name in by_layer[key]:
            for i in range(len(readers)):
                values[i].append(scores(i, name).reshape(-1))
                masks[i].append(mask_of(i, name).reshape(-1))
        for i, j in pairs:
            a, b = torch.cat(masks[i]), torch.cat(masks[j])
            both, either = int((a & b).sum()), int((a | b).sum())
            counts[(i, j)][key] = [both, either]
            va, vb = torch.cat(values[i]), torch.cat(values[j])
            rows[(i, j)].append(
                {
                    "layer": key,
                    "jaccard": both / either if either else None,
                    "spearman": spearman(va, vb),
                }
            )
    result = []
    for i, j in pairs:
        both = sum(c[0] for c in counts[(i, j)].values())
        either = sum(c[1] for c in counts[(i, j)].values())
        result.append(
            {
                "a": str(readers[i].path),
                "b": str(readers[j].path),
                "layers": rows[(i, j)],
                "overall": {
                    "jaccard": both / either if either else None,
                    # mean over layers: pooling a whole model's ranks would not fit
                    "spearman_mean": _mean(r["spearman"] for r in rows[(i, j)]),
                },
            }
        )
    return {"density": density, "masks_from": masks_from, "tensors": len(common), "pairs": result}


def _mean(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def merge_masks(
    readers: Sequence[ScoreReader],
    base_dir: str | os.PathLike,
    model_dirs: Sequence[str | os.PathLike],
    settings: MaskSettings,
) -> Callable[[int, str], torch.Tensor]:
    """``mask_of`` for :func:`compare_files`: the mask the merge applies to model i's
    task vector, protected tensors whole."""
    base = Checkpoint(base_dir)
    models = [Checkpoint(m) for m in model_dirs]

    def mask_of(i: int, name: str) -> torch.Tensor:
        theta = models[i].get(name).float()
        delta = theta - base.get(name).float()
        located = _located(model_dirs[i], name, readers[i])
        return kept_mask(located, theta, delta, settings, str(model_dirs[i]))

    return mask_of


def _located(model, name, reader) -> TensorScores:
    """The tensor's scores as the merge reads them; a tensor whose scores are all equal
    (which the merge refuses unless ``missing_scores`` says otherwise) is shown ranked
    by |delta|, as ``missing_scores: magnitude`` merges it."""
    return TensorScores(model, name, reader, missing_scores="magnitude")
