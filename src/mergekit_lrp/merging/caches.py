"""What the merge kernels keep between tensors of one merge, dropped when it ends.

mergekit calls a kernel one tensor at a time, so a kernel keeps what several tensors
share: regmean's factorization of a layer input's summed Gram matrices, lrp's OBS
column factors, a score file's per-tensor budget shares, the open score files. None of
it may outlive the merge (a later merge in the same process, e.g. a notebook or the
benchmark, must read its own files afresh): the run guard calls
:func:`clear_merge_caches` at its end.
"""

from __future__ import annotations


def clear_merge_caches() -> None:
    from mergekit_lrp.merging.budgets import forget_budgets
    from mergekit_lrp.merging.gram_solve import forget_factors
    from mergekit_lrp.merging.tensor_scores import forget_readers

    forget_factors()
    forget_budgets()
    forget_readers()
