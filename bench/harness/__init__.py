"""The benchmark harness behind scripts/bench_quality.py.

Quality (merges on the toy families, :mod:`toy_family`): ``methods`` (the table rows as
data), ``score_sets`` (cached score files), ``evaluation``, ``jobs`` (one table cell a
job; a process pool that resumes from the rows already saved), ``quality`` (one run, end to
end), ``quality_report`` and ``plots``.

``merge`` is mergekit's ``run_merge`` as the benchmarks call it. See docs/BENCHMARKS.md.
"""
