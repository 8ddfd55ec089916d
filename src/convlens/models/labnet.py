"""The PW-11 lab network: 3 conv layers and 2 dense layers, 7,465 parameters.

Layer names follow the Keras model of the report (``l1`` … ``l5``). Each of
``l1``–``l4`` is a layer followed by its ReLU, so the output of ``model.l1`` is the
post-activation feature map, as in Keras. The model takes images in [0, 1] and
standardizes them with two fixed buffers (not parameters); it returns logits.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvReLU(nn.Module):
    """A 'same'-padded convolution followed by a ReLU (a Keras Conv2D with relu)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class DenseReLU(nn.Module):
    """A fully connected layer followed by a ReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


class LabNet(nn.Module):
    """The report's MNIST CNN."""

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(float(mean)))
        self.register_buffer("input_std", torch.tensor(float(std)))
        self.l1 = ConvReLU(1, 9, 5)
        self.l1_mp = nn.MaxPool2d(2)
        self.l2 = ConvReLU(9, 9, 5)
        self.l2_mp = nn.MaxPool2d(2)
        self.l3 = ConvReLU(9, 16, 3)
        self.l3_mp = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.l4 = DenseReLU(144, 25)
        self.l5 = nn.Linear(25, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        x = self.l1_mp(self.l1(x))
        x = self.l2_mp(self.l2(x))
        x = self.l3_mp(self.l3(x))
        return self.l5(self.l4(self.flat(x)))


SUMMARY_LAYERS = ["l1", "l1_mp", "l2", "l2_mp", "l3", "l3_mp", "flat", "l4", "l5"]
KERAS_TYPES = {ConvReLU: "Conv2D", nn.MaxPool2d: "MaxPooling2D", nn.Flatten: "Flatten",
               DenseReLU: "Dense", nn.Linear: "Dense"}


def summary_rows(model: LabNet) -> list[dict]:
    """Rows of the report's architecture table: layer, type, output shape (NHWC), parameters."""
    shapes: dict[str, tuple] = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name in SUMMARY_LAYERS]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *model.input_shape, device=model.input_mean.device))
    finally:
        for h in handles:
            h.remove()
    rows = [{"layer": "l0", "type": "InputLayer", "output_shape": "(None, 28, 28, 1)", "params": 0}]
    for name in SUMMARY_LAYERS:
        module = getattr(model, name)
        shape = shapes[name]
        if len(shape) == 3:  # report in Keras' channels-last order
            shape = (shape[1], shape[2], shape[0])
        rows.append({"layer": name, "type": KERAS_TYPES[type(module)],
                     "output_shape": "(None, " + ", ".join(map(str, shape)) + ")",
                     "params": sum(p.numel() for p in module.parameters())})
    return rows


def summary_table(model: LabNet) -> str:
    rows = summary_rows(model)
    lines = [f"{'Layer (type)':<28}{'Output Shape':<22}{'Param #':>8}"]
    lines += [f"{r['layer'] + ' (' + r['type'] + ')':<28}{r['output_shape']:<22}{r['params']:>8}" for r in rows]
    total = sum(r["params"] for r in rows)
    lines.append(f"Total params: {total:,}")
    return "\n".join(lines)
