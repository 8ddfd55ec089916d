"""ReLU rules keep the forward bit-identical for every way of writing a ReLU (issue 10 item 2)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import attribute
from convlens.hooks import relu_rule

# Each writes a ReLU-family op on ``h`` *without using its return value* where it is in place,
# so a rule that returns a new tensor instead of modifying ``h`` changes the forward.
INPLACE = {
    "method relu_": lambda h: h.relu_(),
    "torch.relu_": lambda h: torch.relu_(h),
    "F.relu_": lambda h: F.relu_(h),
    "F.relu inplace": lambda h: F.relu(h, inplace=True),
    "nn.ReLU inplace": lambda h: nn.ReLU(inplace=True)(h),
    "clamp_ min 0": lambda h: h.clamp_(min=0),
    "clamp_min_": lambda h: h.clamp_min_(0),
    "F.relu6 inplace": lambda h: F.relu6(h, inplace=True),
    "nn.ReLU6 inplace": lambda h: nn.ReLU6(inplace=True)(h),
    "F.hardtanh 0..6 inplace": lambda h: F.hardtanh(h, 0.0, 6.0, inplace=True),
}
# The out-of-place twin of each (same values, return value used).
OUT_OF_PLACE = {
    "method relu_": lambda h: h.relu(), "torch.relu_": torch.relu, "F.relu_": F.relu,
    "F.relu inplace": F.relu, "nn.ReLU inplace": nn.ReLU(), "clamp_ min 0": lambda h: h.clamp(min=0),
    "clamp_min_": lambda h: torch.clamp_min(h, 0), "F.relu6 inplace": F.relu6, "nn.ReLU6 inplace": nn.ReLU6(),
    "F.hardtanh 0..6 inplace": lambda h: F.hardtanh(h, 0.0, 6.0),
}


class ReuseNet(nn.Module):
    """conv → ReLU written as ``relu`` → conv that reads the same variable again (and a skip)."""

    def __init__(self, relu, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.relu, self.inplace = relu, inplace

    def act(self, h):
        if self.inplace:
            self.relu(h)  # return value ignored: h itself must change
            return h
        return self.relu(h)

    def forward(self, x):
        h = self.act(self.conv1(x) * 3)
        h = self.act(self.conv2(h) * 3 + h)
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("how", sorted(INPLACE))
@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_forward_under_rule_is_bit_identical(how, rule, x):
    net = ReuseNet(INPLACE[how], inplace=True).eval()
    with torch.no_grad():
        plain = net(x)
    xr = x.clone().requires_grad_(True)
    with relu_rule(rule) as mode:
        ruled = net(xr)
    assert mode.calls == 2, how  # both ReLUs went through the rule
    assert torch.equal(ruled, plain), (how, float((ruled - plain).abs().max()))


@pytest.mark.parametrize("how", sorted(INPLACE))
@pytest.mark.parametrize("method", ["guided-backprop", "deconvnet", "guided-gradcam"])
def test_inplace_twin_gives_the_same_maps(how, method, x):
    a = ReuseNet(INPLACE[how], inplace=True).eval()
    b = ReuseNet(OUT_OF_PLACE[how], inplace=False).eval()
    ra, rb = attribute(method, a, x, target=1, layer="conv2"), attribute(method, b, x, target=1, layer="conv2")
    assert torch.equal(ra.raw, rb.raw), (how, method)
    if method != "guided-gradcam":  # the rule applied: the map differs from the plain gradient
        assert not torch.allclose(ra.raw, attribute("saliency", a, x, target=1).raw)


def test_clamp_with_other_bounds_is_not_a_relu(x):
    net = ReuseNet(lambda h: h.clamp(min=-1.0), inplace=False).eval()
    with relu_rule("guided") as mode:
        net(x.clone().requires_grad_(True))
    assert mode.calls == 0
