"""DeepLIFT and GradientSHAP against Captum and their formulas; summation to delta."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import attribute, make_method


class ReluNet(nn.Module):
    """conv → ReLU → conv → ReLU6 → avg pool → linear → ReLU → linear (modules, as Captum needs them)."""

    def __init__(self, inplace: bool = False, functional: bool = False, relu6: bool = True):
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.act2 = nn.ReLU6(inplace=inplace) if relu6 else nn.ReLU(inplace=inplace)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(8 * 3 * 3, 10)
        self.act3 = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(10, 4)
        self.functional = functional

    def forward(self, x):
        if self.functional:
            h = self.pool(F.relu6(self.conv2(self.conv1(x).relu_()) * 3))
            return self.fc2(torch.relu(self.fc1(h.flatten(1))))
        h = self.pool(self.act2(self.conv2(self.act1(self.conv1(x))) * 3))
        return self.fc2(self.act3(self.fc1(h.flatten(1))))


TARGETS = [0, 3, 2]


@pytest.fixture
def x():
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(8))


def test_deeplift_matches_captum(x):
    """Captum's DeepLift treats ReLU6 by its gradient, so the comparison uses plain ReLUs."""
    captum = pytest.importorskip("captum.attr")
    net = ReluNet(relu6=False).eval()
    base = torch.full_like(x, 0.1)
    ours = attribute("deeplift", net, x, target=TARGETS, baseline=base)
    ref = captum.DeepLift(ReluNet(relu6=False).eval()).attribute(x, baselines=base, target=TARGETS)
    assert torch.allclose(ours.raw, ref, atol=1e-5)
    assert ours.raw.abs().sum() > 0


def test_deeplift_sums_to_delta_with_relu6(x):
    net = ReluNet().eval()
    base = torch.full_like(x, 0.1)
    ours = attribute("deeplift", net, x * 4, target=TARGETS, baseline=base)  # ×4: some units pass 6
    with torch.no_grad():
        delta = net(x * 4)[range(3), TARGETS] - net(base)[range(3), TARGETS]
        assert bool((net.conv2(net.act1(net.conv1(x * 4))) * 3 > 6).any())
    assert torch.allclose(ours.raw.flatten(1).sum(1), delta, atol=1e-4)
    assert float(ours.extras["delta_gap"].max()) < 1e-4


def test_deeplift_same_with_inplace_and_functional_relus(x):
    plain = ReluNet().eval()
    for twin in (ReluNet(inplace=True).eval(), ReluNet(functional=True).eval()):
        twin.load_state_dict(plain.state_dict())
        a = attribute("deeplift", plain, x, target=TARGETS)
        b = attribute("deeplift", twin, x, target=TARGETS)
        assert torch.allclose(a.raw, b.raw, atol=1e-6)
    with torch.no_grad():  # the rule leaves the forward as it is
        assert torch.equal(plain(x), twin(x))


@pytest.mark.parametrize("kind", ["plain", "inplace", "functional"])
def test_deeplift_reference_pass_equals_the_joint_batch(x, kind):
    """The reference-first passes give what one batch [inputs; references] through the rule gives."""
    net = ReluNet(inplace=kind == "inplace", functional=kind == "functional").eval()
    method = make_method("deeplift", net, baseline=torch.full_like(x, 0.1))
    x0 = method.baseline
    with torch.no_grad():
        joint, _, _, _ = method.joint_pass(x * 4, x0, TARGETS)
        split, _, _, _ = method.reference_passes(x * 4, x0, TARGETS)
    assert torch.allclose(split, joint, atol=1e-6) and float(joint.abs().sum()) > 0


class BranchyNet(ReluNet):
    """A ReLU-family call only for inputs whose mean is positive: the two forwards differ."""

    def forward(self, x):
        out = super().forward(x)
        return F.relu(out) - 1 if bool(x.mean() > 0) else out


def test_deeplift_data_dependent_relu_calls_fall_back_to_one_batch(x):
    net = BranchyNet().eval()
    x = x.abs() + 0.1  # mean > 0; the zero baseline's is not: the input's forward runs one ReLU more
    method = make_method("deeplift", net)
    res = method.attribute(x, TARGETS)
    with torch.no_grad():
        joint, y, y0, _ = method.joint_pass(x, torch.zeros_like(x), TARGETS)
    assert torch.allclose(res.raw, x * joint, atol=1e-6) and float(joint.abs().sum()) > 0
    assert torch.allclose(res.extras["delta"], y - y0, atol=1e-6)
    assert float(res.extras["delta_gap"].max()) < 1e-4


def test_deeplift_differs_from_gradient_times_delta(x):
    net = ReluNet().eval()
    dl = attribute("deeplift", net, x, target=TARGETS)
    ixg = attribute("input-x-gradient", net, x, target=TARGETS)
    assert not torch.allclose(dl.raw, ixg.raw, atol=1e-3)


def test_gradient_shap_formula_with_its_draws(x):
    net = ReluNet().eval()
    pool = torch.stack([torch.zeros(3, 12, 12), torch.full((3, 12, 12), 0.5), torch.rand(3, 12, 12)])
    method = make_method("gradient-shap", net, baselines=pool, samples=5, sigma=0.2, seed=3, batch_size=7)
    index, alpha, noise = method.draws(x)
    want = torch.zeros_like(x)
    for s in range(5):
        for n in range(3):
            b = pool[index[s, n]]
            noisy = x[n] + noise[s, n]
            point = (b + alpha[s, n] * (noisy - b))[None].requires_grad_(True)
            g = torch.autograd.grad(net(point)[0, TARGETS[n]], point)[0][0]
            want[n] += (noisy - b) * g / 5
    res = method.attribute(x, TARGETS)
    assert torch.allclose(res.raw, want, atol=1e-5)
    assert len(index.unique()) > 1 and noise.abs().sum() > 0


def test_gradient_shap_approaches_integrated_gradients_with_one_baseline(x):
    net = ReluNet().eval()
    gs = attribute("gradient-shap", net, x, target=TARGETS, baselines="zero", samples=400, sigma=0.0)
    ig = attribute("integrated-gradients", net, x, target=TARGETS, steps=200)
    err = (gs.raw - ig.raw).flatten(1).norm(dim=1) / ig.raw.flatten(1).norm(dim=1)
    assert float(err.max()) < 0.15
