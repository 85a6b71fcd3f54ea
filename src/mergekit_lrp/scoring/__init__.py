"""Scoring a checkpoint: ``lrp-compute`` (:mod:`.cli`), its options, the prompt loop,
the AttnLRP rules (:mod:`.attnlrp`), accumulation, resume and several processes.
Imports neither mergekit nor :mod:`mergekit_lrp.merging`."""
