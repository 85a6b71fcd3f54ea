"""Looking at score files before a merge: ``lrp-inspect`` (:mod:`.cli`).

:mod:`.names` classifies tensors by name (layer, module kind), :mod:`.stats` computes
every number (summaries, what ``lrp`` would keep, comparisons of files) and
:mod:`.plots` draws them. Imports the score format and the merge's own selection
(:mod:`mergekit_lrp.merging.tensor_scores`, :mod:`mergekit_lrp.merging.selection`),
never the AttnLRP rules, the plugin or mergekit.
"""
