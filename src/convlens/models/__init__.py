"""Networks convlens knows by name, and loading "a run or a checkpoint" by one string."""
from .labnet import LabNet, summary_rows, summary_table  # noqa: F401
from .efficientnet_lite import EfficientNetLite, efficientnet_lite0  # noqa: F401
from .registry import LoadedModel, load_model, load_checkpoint, DEFAULT_RUN  # noqa: F401
