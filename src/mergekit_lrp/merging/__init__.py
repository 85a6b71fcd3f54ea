"""Merging with scores: the merge methods (:mod:`.methods`), the scores of one tensor
(:mod:`.tensor_scores`), top-k selection, the pre-merge check and staged output.
Never imports the AttnLRP rules."""
