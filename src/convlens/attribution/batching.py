"""How many inputs one forward takes when a method runs many copies of a batch."""
from __future__ import annotations

import torch


GRADIENT_VALUES = 4_000_000  # copies that need a backward: whole sample sets of the lab network in one call


def auto_batch_size(x: torch.Tensor, values: int = 1_500_000, least: int = 8, most: int = 8192) -> int:
    """Inputs per forward: about ``values`` input values, between ``least`` and ``most``.

    On a 2-core CPU a forward has a large fixed cost for small images (many 28 × 28 copies per call
    win: SmoothGrad² of the lab network at batch 256 took 10.5 s in chunks of 256 inputs, 3.2 s in one
    call) while large images gain nothing past about ten per call (224 × 224 RGB → 10).
    """
    return max(least, min(most, values // max(1, x[0].numel())))
