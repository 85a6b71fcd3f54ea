"""Everything that touches mergekit itself: the start-up hook, the registration of this
project's merge methods, the guard around ``run_merge`` and the planner patches. Cheap to
import."""
