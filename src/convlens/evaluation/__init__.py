"""How faithful is a map? Perturbation metrics and sanity checks, for any attribution method."""
from ..baselines import blur  # noqa: F401
from .perturbation import auc, average_drop_increase, deletion_insertion  # noqa: F401
from .sanity import cascading_randomization, randomized  # noqa: F401
