"""Integrated gradients: the true minimum as baseline, the completeness gap reported and used (item 6)."""
import warnings

import pytest
import torch
from torch import nn

from convlens.attribution.gradient import IntegratedGradients
from convlens.errors import ConvlensError


class CurvedNet(nn.Module):
    """Strongly non-linear in the input (so few steps leave a visible completeness gap)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.mul_(4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).pow(3).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    return CurvedNet().eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_min_baseline_is_the_input_minimum(net, x):
    lo = -127.0 / 128.0
    by_range = IntegratedGradients(net, steps=8, baseline="min", input_range=(lo, 1.0)).attribute(x, 1)
    by_tensor = IntegratedGradients(net, steps=8, baseline=torch.full((3, 8, 8), lo)).attribute(x, 1)
    assert torch.equal(by_range.raw, by_tensor.raw)
    by_min = IntegratedGradients(net, steps=8, baseline="min", input_min=lo).attribute(x, 1)
    assert torch.equal(by_min.raw, by_tensor.raw)
    with pytest.raises(ConvlensError, match="input range"):
        IntegratedGradients(net, steps=8, baseline="min").attribute(x, 1)


def test_completeness_gap_reported_by_hand(net, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = IntegratedGradients(net, steps=1, tolerance=0.05).attribute(x, 1)
    with torch.no_grad():
        delta = net(x)[:, 1] - net(torch.zeros_like(x))[:, 1]
    gap = (res.raw.flatten(1).sum(1) - delta).abs() / delta.abs()
    assert torch.allclose(res.extras["completeness_gap"], gap, rtol=1e-4, atol=1e-6)
    assert torch.allclose(res.extras["delta"], delta, rtol=1e-5, atol=1e-6)
    assert res.extras["steps"].tolist() == [1, 1, 1]
    assert float(gap.max()) > 0.05  # the case is hard enough to warn
    assert any("completeness gap above 5%" in str(w.message) for w in caught)


def test_default_steps_are_chosen_by_the_gap(net, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = IntegratedGradients(net, tolerance=2.5e-4).attribute(x, 1)
    used = auto.extras["steps"].tolist()
    gap = auto.extras["completeness_gap"]
    assert set(used) <= {32, 96, 288} and max(used) > 32  # at least one input needed a finer grid
    assert all(g <= 2.5e-4 or s == 288 for g, s in zip(gap.tolist(), used))
    for i, steps in enumerate(used):  # the tripled grid that reuses points equals a plain run at that count
        fixed = IntegratedGradients(net, steps=steps, tolerance=1.0).attribute(x[i:i + 1], 1)
        assert torch.allclose(auto.raw[i:i + 1], fixed.raw, rtol=1e-4, atol=1e-6), steps
