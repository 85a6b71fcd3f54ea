"""The score file: the format both sides share (:mod:`.file`) and the checkpoint
fingerprint it carries (:mod:`.fingerprint`). Imports neither scoring nor merging."""
