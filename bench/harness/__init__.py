"""The benchmark harness behind scripts/bench_quality.py and scripts/bench_perf.py.

Quality (merges on the toy families, :mod:`toy_family`): ``methods`` (the table rows as
data), ``score_sets`` (cached score files), ``evaluation``, ``jobs`` (one table cell a
job; a process pool that resumes from the rows already saved), ``quality`` (one run, end to
end), ``quality_report`` and ``plots``.

Cost (random Llamas): ``perf_models``, ``perf_workers`` (each measurement in a fresh
process), ``perf_sections`` and ``perf_report``.

``merge`` is mergekit's ``run_merge`` as both sides call it. See docs/BENCHMARKS.md.
"""
