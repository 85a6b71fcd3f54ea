"""Published data-free merges that solve the interference per layer, as mergekit methods
for the benchmark: TSV-M (:mod:`.tsv_m`), Iso-C (:mod:`.iso_c`) and WUDI's closed form
(:mod:`.wudi`). mergekit ships none of them; :func:`register` makes them available to
``run_merge`` by name in this process, so their rows run through the same merges as
every other row. They are benchmark rows, not methods of the package: docs/BENCHMARKS.md
says where each stands.
"""

from __future__ import annotations


def register() -> None:
    """Register the peers with mergekit (once per process)."""
    from mergekit.merge_methods import registry

    from peers.iso_c import iso_c_merge
    from peers.tsv_m import tsv_m_merge
    from peers.wudi import wudi_merge

    known = {method.spec.name for method in registry.registered_methods()}
    for method in (tsv_m_merge, iso_c_merge, wudi_merge):
        if method.spec.name not in known:
            registry.register(method)
