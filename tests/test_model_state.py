"""Model state around every forward convlens runs (issue 10 items 1 and 4)."""
import pytest
import torch
from torch import nn

from convlens.attribution import METHODS, make_method
from convlens.attribution.cam import CamMethod
from convlens.evaluation import average_drop_increase, deletion_insertion
from convlens.evaluation.sanity import cascading_randomization
from convlens.hooks import evaluating
from convlens.stats import collect

OPTIONS = {"smoothgrad": {"samples": 2}, "integrated-gradients": {"steps": 4}}


class BnNet(nn.Module):
    """conv → BatchNorm → ReLU → dropout → conv → BatchNorm → ReLU → GAP → linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial running statistics
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.drop(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.act2(self.bn2(self.conv2(h))).mean((2, 3)))


@pytest.fixture
def x():
    return torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))


def mixed_mode(net: nn.Module) -> dict[str, bool]:
    """Train mode, except bn2 (a frozen-BN fine-tuning set-up): the flags to restore."""
    net.train()
    net.bn2.eval()
    return {name: m.training for name, m in net.named_modules()}


def buffers(net):
    return {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_train_mode_model_uses_eval_and_restores_flags(name, x):
    net = BnNet()
    reference = make_method(name, BnNet().eval(), **OPTIONS.get(name, {})).attribute(x, 1)
    flags, before = mixed_mode(net), buffers(net)
    res = make_method(name, net, **OPTIONS.get(name, {})).attribute(x, 1)
    assert all(torch.equal(before[k], v) for k, v in net.named_buffers()), "BatchNorm statistics changed"
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert torch.allclose(res.maps, reference.maps, atol=1e-6)  # eval-mode forward: no dropout, running stats


def test_stats_perturbation_and_sanity_restore_flags(x):
    net = BnNet()
    flags, before = mixed_mode(net), buffers(net)
    collect(net, [(x, torch.tensor([0, 1, 2]))], ["act1"], classes=5)
    maps = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2])
    a = deletion_insertion(net, x, maps, t, steps=4)
    b = average_drop_increase(net, x, maps, t)
    cascading_randomization(net, {"input": lambda xs, ts: xs[:, 0]}, x, t)
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert all(torch.equal(before[k], v) for k, v in net.named_buffers())
    ref = BnNet().eval()
    assert torch.equal(a.deletion, deletion_insertion(ref, x, maps, t, steps=4).deletion)
    assert b == average_drop_increase(ref, x, maps, t)


def test_evaluating_restores_each_flag_after_an_exception():
    net = BnNet()
    flags = mixed_mode(net)
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(net):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("inside")
    assert {n: m.training for n, m in net.named_modules()} == flags


CAM_METHODS = sorted(n for n, c in METHODS.items() if isinstance(c, type) and (issubclass(c, CamMethod) or
                                                                             getattr(c, "needs_layer", False)))


@pytest.mark.parametrize("name", CAM_METHODS)
def test_cam_methods_work_inside_no_grad(name, x):
    net = BnNet().eval()
    outside = make_method(name, net).attribute(x, 2)
    with torch.no_grad():
        inside = make_method(name, net).attribute(x, 2)
    assert torch.equal(inside.maps, outside.maps) and float(inside.maps.abs().sum()) > 0
    with torch.inference_mode():
        assert torch.equal(make_method(name, net).attribute(x, 2).maps, outside.maps)
        made_here = x.clone()  # an inference tensor
    assert torch.equal(make_method(name, net).attribute(made_here, 2).maps, outside.maps)
