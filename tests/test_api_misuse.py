"""Python API misuse ends in one ConvlensError naming the problem (issue 13 family 7)."""
import pytest
import torch
from torch import nn

from convlens.attribution import METHODS, make_method
from convlens.errors import ConvlensError

OPTIONS = {"smoothgrad": {"samples": 2}, "integrated-gradients": {"steps": 2}}


class FlatHead(nn.Module):
    """conv → ReLU → max-pool 2 → flatten → linear: needs exactly 8×8 inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class GapHead(nn.Module):
    """conv → ReLU → conv → ReLU → GAP → linear: a CAM-compatible head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


def net_for(name):
    return (GapHead() if name == "cam" else FlatHead()).eval()


def run(name, x, target=None):
    return make_method(name, net_for(name), **OPTIONS.get(name, {})).attribute(x, target)


GOOD = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_inputs_are_named(name):
    run(name, GOOD)  # the valid call works
    with pytest.raises(ConvlensError, match="empty batch"):
        run(name, GOOD[:0])
    with pytest.raises(ConvlensError, match="float64 but the model's weights are float32"):
        run(name, GOOD.double())
    with pytest.raises(ConvlensError, match="uint8"):
        run(name, (GOOD * 255).to(torch.uint8))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = GOOD.clone()
        x[1, 0, 3, 4] = bad
        with pytest.raises(ConvlensError, match="1 NaN or infinite"):
            run(name, x)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_targets_are_named(name):
    with pytest.raises(ConvlensError, match="not str 'cat'"):
        run(name, GOOD, "cat")
    with pytest.raises(ConvlensError, match="not float 1.7"):
        run(name, GOOD, 1.7)
    with pytest.raises(ConvlensError, match="truncated"):
        run(name, GOOD, torch.tensor([1.7, 0.2]))
    with pytest.raises(ConvlensError, match="out of range 0..2"):
        run(name, GOOD, 3)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"cam"}))
def test_input_too_small_for_the_network(name):
    with pytest.raises(ConvlensError, match=r"cannot run on inputs of size 6×6"):
        run(name, torch.rand(1, 1, 6, 6))
    with pytest.raises(ConvlensError, match=r"cannot run on inputs of size 1×1"):
        run(name, torch.rand(1, 1, 1, 1))


def test_a_model_error_that_is_not_about_size_stays_itself():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA error: device-side assert")

    with pytest.raises(RuntimeError, match="device-side"):
        make_method("saliency", Broken()).attribute(GOOD)
