"""Tiny, locally built model families (Llama, Qwen3, Gemma2) on which merge methods can be compared.

``build_family`` trains (or reuses from a cache) a base model, one expert per task and a
multi-task model; ``evaluate_model`` and ``kept_fraction`` score any model on the tasks.
See docs/toy-family.md.
"""

from toy_family.evaluate import evaluate_model, kept_fraction
from toy_family.family import ACCEPTED, PRESETS, Family, build_family

__all__ = ["ACCEPTED", "PRESETS", "Family", "build_family", "evaluate_model", "kept_fraction"]
