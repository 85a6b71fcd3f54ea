"""Looking at score files before a merge: ``lrp-inspect`` (:mod:`.cli`).

:mod:`.stats` computes every number (summaries, what ``lrp`` would keep, comparisons of
files) and :mod:`.plots` draws them. Tensor names are read by the merge's own parser
(:mod:`mergekit_lrp.merging.tensor_names`) and every mask is the merge's own
(:mod:`mergekit_lrp.merging.masks`); never imports the AttnLRP rules, the plugin or
mergekit.
"""
