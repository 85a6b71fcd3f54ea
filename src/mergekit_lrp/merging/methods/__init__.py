"""The merge methods this project adds to mergekit, one module each, and their table.

Each spec module (``lrp``, ``circuit``, ``regmean``) defines, under the same names:
``NAME``; its settings class, which owns every global parameter's default, choices and
check, and ``DEFAULTS``, an instance of it; ``settings_of(parameters)`` (a task's resolved
global parameters, checked); ``reads_files(settings)``; ``check_model(settings, model,
parameters)`` and ``check_tensor(settings, weight, inputs, base)`` (the pre-merge checks
of one planned tensor: the fine-tunes' inputs, and the base's for a method that reads a
file of the base; :mod:`..preflight`); ``describe(card, parameters)`` (its model-card
text, :mod:`..model_card`). The registered mergekit method (``<name>_merge``, whose
signature reads its defaults from ``DEFAULTS``) lives in the same module, or, for
``lrp``, whose spec the notebook API and ``lrp-inspect`` read without mergekit, in
``lrp_kernel``. Registration, the start-up hook, the run guard, the pre-merge check and
the model card all iterate :data:`METHODS`; a new method is a new module here and one
row below.

This module imports nothing heavy: the start-up hook reads it in every interpreter.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: the module that is the method's spec
    module: str
    #: the module defining its registered mergekit method, and that method's name there
    kernel_module: str
    kernel: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def registered(self):
        """The registered mergekit method (imports mergekit)."""
        return getattr(importlib.import_module(self.kernel_module), self.kernel)


_HERE = "mergekit_lrp.merging.methods"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lrp", f"{_HERE}.lrp", f"{_HERE}.lrp_kernel", "lrp_merge"),
        MethodSpec("circuit", f"{_HERE}.circuit", f"{_HERE}.circuit", "circuit_merge"),
        MethodSpec("regmean", f"{_HERE}.regmean", f"{_HERE}.regmean", "regmean_merge"),
    )
}


def spec_of(method_name: str) -> ModuleType:
    """The spec module of one of this project's methods, by its merge-method name."""
    return METHODS[method_name].load()
