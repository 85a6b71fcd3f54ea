"""Everything that touches mergekit itself: the start-up hook, registration of ``lrp``,
the guard around ``run_merge`` and the planner patches. Cheap to import."""
