"""The score file shared by ``lrp-compute`` and the merge methods.

One safetensors file per model (format described in docs/score-format.md). Each tensor
has the name and shape of a checkpoint tensor and holds, per entry, the mean over the
calibration prompts of the quantity the signal measures (:data:`QUANTITIES`: |d target /
d theta| for attnlrp and gradient, the squared log-likelihood gradient for fisher, the
squared input of the entry's column for activation). The metadata says which, so the
merge knows how to combine the scores with a task vector (docs/method.md).

Files are read one tensor at a time through ``safe_open`` (never ``torch.load``)
and written atomically: a temporary file in the target directory, then a rename.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.gram_forms import (
    DEFAULT_TOLERANCE,
    Factored,
    factored_tensors,
    stored_names,
)

FORMAT_NAME = "mergekit-lrp-scores"
FORMAT_VERSION = "1"
QUANTITY = "mean_abs_grad"
#: quantity -> what it is, per entry, averaged over the calibration prompts
QUANTITIES = {
    "mean_abs_grad": "|d target / d theta| (attnlrp: under the AttnLRP rules; gradient)",
    "mean_sq_grad": "(d log-likelihood / d theta)^2 (fisher: diagonal empirical Fisher)",
    "mean_sq_input": "summed squared input of the entry's column (activation: diag X^T X)",
    "input_gram": "the Gram matrix X^T X of a linear layer's inputs, tokens weighted by the "
    "file's token_weighting (gram: RegMean statistics; one [in, in] matrix per distinct "
    "input, shared by the layers that read it, see gram_of)",
}
#: quantities stored as one matrix per layer input instead of one score per weight entry
GRAM_QUANTITIES = ("input_gram",)
SCORE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}


class ScoreFileError(LrpError):
    """A score file is missing, malformed, or does not belong to its model."""


@dataclass(frozen=True)
class ScoreMetadata:
    """What a score file says about itself (stored as safetensors ``__metadata__``)."""

    model_fingerprint: str
    num_prompts: int
    num_tokens: int
    target: str
    model_type: str
    method: str = "attnlrp"
    quantity: str = QUANTITY
    reduction: str = "mean"
    fingerprint_scheme: str = ""
    # other name of a tied parameter -> the stored tensor holding its scores
    # (e.g. lm_head.weight -> model.embed_tokens.weight)
    aliases: dict[str, str] = field(default_factory=dict)
    # Gram files: each linear weight's checkpoint name -> the stored Gram matrix of its input
    # (q/k/v, or gate/up, read the same input and share one)
    gram_of: dict[str, str] = field(default_factory=dict)
    # Gram files: each Gram matrix stored factored (docs/score-format.md) -> its rank and
    # the bound on its relative error; the others are stored dense
    gram_factored: dict[str, dict] = field(default_factory=dict)
    generator: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_header(self) -> dict[str, str]:
        values = asdict(self)
        for key in ("gram_of", "gram_factored"):  # absent unless used: files keep their bytes
            if not values[key]:
                del values[key]
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        for key, value in values.items():
            header[key] = json.dumps(value) if isinstance(value, dict) else str(value)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, path: Path) -> ScoreMetadata:
        header = dict(header or {})
        if header.get("format") != FORMAT_NAME:
            raise ScoreFileError(
                f"{path}: not a mergekit-lrp score file (metadata format="
                f"{header.get('format')!r}, expected {FORMAT_NAME!r}); create it with lrp-compute"
            )
        if header.get("format_version") != FORMAT_VERSION:
            raise ScoreFileError(
                f"{path}: score format version {header.get('format_version')!r} is not "
                f"supported (this mergekit-lrp reads version {FORMAT_VERSION})"
            )
        if header.get("quantity") not in QUANTITIES or header.get("reduction") != "mean":
            raise ScoreFileError(
                f"{path}: holds quantity={header.get('quantity')!r} "
                f"reduction={header.get('reduction')!r}, which this mergekit-lrp does not know "
                f"(it reads {', '.join(QUANTITIES)}, reduction 'mean'); upgrade mergekit-lrp"
            )
        try:
            return cls(
                model_fingerprint=header["model_fingerprint"],
                num_prompts=int(header["num_prompts"]),
                num_tokens=int(header["num_tokens"]),
                target=header["target"],
                model_type=header["model_type"],
                method=header["method"],
                quantity=header["quantity"],
                fingerprint_scheme=header.get("fingerprint_scheme", ""),
                aliases=json.loads(header.get("aliases", "{}")),
                gram_of=json.loads(header.get("gram_of", "{}")),
                gram_factored=json.loads(header.get("gram_factored", "{}")),
                generator=header.get("generator", ""),
                extra=json.loads(header.get("extra", "{}")),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ScoreFileError(f"{path}: malformed score metadata ({error!r})") from None


class ScoreReader:
    """Lazy, validating access to one score file.

    The file is validated once with safetensors' ``safe_open``, then each tensor is read
    with an ordinary positioned read of its bytes. Nothing stays memory-mapped, so a merge
    that reads every score tensor does not accumulate the score files' pages in its
    resident memory (measured: 1.23x dare_ties' peak RSS with a kept mapping, see
    docs/BENCHMARKS.md).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ScoreFileError(f"score file {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                header = handle.metadata()
        except (SafetensorError, OSError, ValueError) as error:
            raise ScoreFileError(
                f"{self.path}: not a readable safetensors file ({error}); "
                "it may be truncated or not a score file"
            ) from None
        self.metadata = ScoreMetadata.from_header(header, self.path)
        self._entries, self._data_start = _tensor_entries(self.path)
        self._names = set(self._entries)
        for stored, form in self.metadata.gram_factored.items():
            self._check_factored(stored, form)
            self._names.add(stored)
        for weight, stored in self.metadata.gram_of.items():
            if stored not in self._names:
                raise ScoreFileError(
                    f"{self.path}: the Gram matrix of {weight!r} points to missing {stored!r}"
                )
        for alias, stored in self.metadata.aliases.items():
            if stored not in self._names:
                raise ScoreFileError(f"{self.path}: alias {alias!r} points to missing {stored!r}")

    def names(self) -> set[str]:
        return set(self._names)

    def resolve(self, name: str) -> str | None:
        """The stored tensor holding ``name``'s scores (tied names map to their storage)."""
        if name in self._names:
            return name
        return self.metadata.aliases.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._stored(name)
        if stored in self.metadata.gram_factored:
            n = self._entries[stored_names(stored)[1]]["shape"][0]
            return (n, n)
        return tuple(self._entries[stored]["shape"])

    def dtype_name(self, name: str) -> str:
        stored = self._stored(name)
        if stored in self.metadata.gram_factored:
            stored = stored_names(stored)[0]
        return self._entries[stored]["dtype"]

    @property
    def is_gram(self) -> bool:
        """True for a Gram file: one [in, in] matrix per linear-layer input (``gram_of``)."""
        return self.metadata.quantity in GRAM_QUANTITIES

    def gram_name(self, weight: str) -> str | None:
        """The stored Gram matrix of linear weight ``weight``'s input, or None."""
        return self.metadata.gram_of.get(weight)

    def gram(self, weight: str) -> torch.Tensor:
        """The Gram matrix of ``weight``'s input as float32 [in, in], checked square and
        finite (its off-diagonal entries may be negative, unlike scores)."""
        stored = self.gram_name(weight)
        if stored is None:
            raise ScoreFileError(f"{self.path}: no Gram matrix for {weight!r} (not in gram_of)")
        if stored in self.metadata.gram_factored:
            tensor = self.factored_gram(weight).dense()
        else:
            tensor = self._read(stored)
        if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
            raise ScoreFileError(
                f"{self.path}: the Gram matrix {stored!r} of {weight!r} has shape "
                f"{tuple(tensor.shape)}; a Gram matrix is square, [in, in]"
            )
        if not torch.isfinite(tensor).all():
            raise ScoreFileError(
                f"{self.path}: the Gram matrix {stored!r} of {weight!r} contains NaN or Inf; "
                "recompute the file with lrp-compute"
            )
        return tensor

    def get(self, name: str, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one score tensor as float32, checking dtype, shape and finiteness."""
        stored = self._stored(name)
        entry = self._entries[stored]
        self._check_dtype(stored)
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise ScoreFileError(
                f"{self.path}: scores for {name!r} have shape {tuple(entry['shape'])}, "
                f"the weight has {tuple(shape)}"
            )
        tensor = self._read(stored)
        if tensor.numel():
            # one pass for both checks: NaN makes both ends NaN, an infinity is an end
            low, high = (float(v) for v in torch.aminmax(tensor))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ScoreFileError(f"{self.path}: scores for {name!r} contain NaN or Inf")
            if low < 0:
                raise ScoreFileError(f"{self.path}: scores for {name!r} are negative")
        return tensor

    def factored_gram(self, weight: str) -> Factored:
        """``weight``'s Gram matrix as stored factored (its factor and diagonal, float32);
        :meth:`gram` rebuilds the dense matrix from the same."""
        stored = self.gram_name(weight)
        form = self.metadata.gram_factored.get(stored or "")
        if form is None:
            raise ScoreFileError(
                f"{self.path}: the Gram matrix of {weight!r} is not stored factored"
            )
        factor, diagonal = (self._read(name) for name in stored_names(stored))
        for part, tensor in (("factor", factor), ("diagonal", diagonal)):
            if not torch.isfinite(tensor).all():
                raise ScoreFileError(
                    f"{self.path}: the {part} of Gram matrix {stored!r} of {weight!r} contains "
                    "NaN or Inf; recompute the file with lrp-compute"
                )
        return Factored(factor, diagonal, float(form["error"]))

    def stored_bytes(self) -> int:
        """The bytes of the tensors the file stores."""
        return sum(
            end - start for start, end in (e["data_offsets"] for e in self._entries.values())
        )

    def gram_error(self, weight: str) -> float:
        """The bound on ||G - G~||_2 / ||G||_2 of ``weight``'s stored Gram matrix: 0 when
        it is stored dense."""
        form = self.metadata.gram_factored.get(self.gram_name(weight) or "")
        return float(form["error"]) if form else 0.0

    def _check_factored(self, stored: str, form: dict) -> None:
        """A factored Gram matrix: its factor [n, r] and diagonal [n] present and agreeing
        with each other and with the rank the metadata records."""
        factor, diagonal = stored_names(stored)
        fix = (
            "the file is damaged or was edited; recompute it with lrp-compute --method gram "
            "(add --gram-form dense to store every matrix whole)"
        )
        for name in (factor, diagonal):
            if name not in self._entries:
                raise ScoreFileError(
                    f"{self.path}: factored Gram matrix {stored!r} lacks its tensor {name!r}; {fix}"
                )
            self._check_dtype(name)
        f_shape, d_shape = self._entries[factor]["shape"], self._entries[diagonal]["shape"]
        rank = form.get("rank") if isinstance(form, dict) else None
        if (
            len(f_shape) != 2
            or len(d_shape) != 1
            or f_shape[0] != d_shape[0]
            or f_shape[1] != rank
            or not isinstance(form.get("error"), (int, float))
        ):
            raise ScoreFileError(
                f"{self.path}: factored Gram matrix {stored!r} does not fit together "
                f"(factor {tuple(f_shape)}, diagonal {tuple(d_shape)}, recorded "
                f"{json.dumps(form)}); {fix}"
            )

    def _check_dtype(self, stored: str) -> None:
        dtype = self._entries[stored]["dtype"]
        if dtype not in SCORE_DTYPES:
            raise ScoreFileError(
                f"{self.path}: tensor {stored!r} has dtype {dtype}; scores must be F32 or BF16"
            )

    def _read(self, stored: str) -> torch.Tensor:
        """The stored tensor ``stored`` as float32 (dtype checked, values not)."""
        entry = self._entries[stored]
        self._check_dtype(stored)
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)  # not zero-filled first
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + start)
            if handle.readinto(buffer.numpy()) != end - start:
                raise ScoreFileError(f"{self.path}: truncated while reading {stored!r}")
        return buffer.view(SCORE_DTYPES[entry["dtype"]]).reshape(entry["shape"]).float()

    def _stored(self, name: str) -> str:
        stored = self.resolve(name)
        if stored is None:
            raise ScoreFileError(f"{self.path}: no scores for tensor {name!r}")
        return stored


def _tensor_entries(path: Path) -> tuple[dict[str, dict], int]:
    """(name -> {dtype, shape, data_offsets}, offset of the data) from a safetensors header
    that ``safe_open`` has already validated."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def write_scores(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: ScoreMetadata,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a score file atomically: nothing at ``path`` until it is complete."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ScoreFileError(f"output directory {path.parent} does not exist")
    converted = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    atomic_save(path, converted, metadata.to_header())


def sort_metadata_in_place(handle) -> None:
    """Sort the ``__metadata__`` keys of a just-written safetensors header.

    safetensors writes metadata from a hash map, so key order (and thus the file's
    bytes) varies between runs; sorted keys make identical inputs give identical
    files. The compact JSON keeps its length, so the data offsets are untouched.
    """
    size = struct.unpack("<Q", handle.read(8))[0]
    raw = handle.read(size)
    header = json.loads(raw)
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (size - len(text))
    if len(text) != size:
        raise ScoreFileError("could not canonicalise a safetensors header")
    handle.seek(8)
    handle.write(text)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(path: Path, tensors: Mapping[str, torch.Tensor], header: dict[str, str]) -> None:
    """``save_file`` into a temporary sibling, fsync, then rename over ``path``; the file
    gets the permissions of any newly created file (``mkstemp`` makes it private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "r+b") as handle:
            sort_metadata_in_place(handle)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def factor_gram_file(
    source, output, tolerance: float = DEFAULT_TOLERANCE, max_rank: int | None = None
) -> dict[str, dict]:
    """Write a copy of Gram file ``source`` with its matrices factored (what
    ``lrp-compute --gram-form factored`` writes); returns the ``gram_factored`` metadata."""
    reader = ScoreReader(source)
    if not reader.is_gram:
        raise ScoreFileError(
            f"{reader.path}: not a Gram file (quantity {reader.metadata.quantity})"
        )
    stored = sorted(set(reader.metadata.gram_of.values()))
    first_user = {s: min(w for w, g in reader.metadata.gram_of.items() if g == s) for s in stored}
    grams = {s: reader.gram(first_user[s]) for s in stored}
    tensors, factored = factored_tensors(grams, tolerance, max_rank)
    write_scores(output, tensors, replace(reader.metadata, gram_factored=factored))
    return factored
