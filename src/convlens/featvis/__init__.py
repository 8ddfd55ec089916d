"""Feature visualization: activation maximization with composable objectives."""
from .objectives import Objective, channel, class_logit, unit  # noqa: F401
from .optimize import ActMaxConfig, ActMaxResult, maximize  # noqa: F401
