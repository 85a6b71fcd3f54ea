"""Merging with scores: the ``lrp`` method (:mod:`.method`), the scores of one tensor
(:mod:`.tensor_scores`), top-k selection, the pre-merge check and staged output.
Never imports the AttnLRP rules."""
