"""LRP: identities, Captum's LRP, the first-layer rules written out, canonization restored exactly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import attribute, make_method
from convlens.attribution.lrp import COMPOSITES, LRP
from convlens.errors import ConvlensError
from convlens.hooks import count_hooks


class PlainNet(nn.Module):
    """conv → ReLU → max pool → conv → ReLU → linear → ReLU → linear, every op a module (Captum's LRP
    needs that); ``bias=False`` for the comparison with Captum, which keeps biases out of its γ/α rules."""

    def __init__(self, bias: bool = True, inplace: bool = False):
        super().__init__()
        torch.manual_seed(6)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(8 * 5 * 5, 12, bias=bias)
        self.relu3 = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(12, 4, bias=bias)

    def forward(self, x):
        h = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(h.flatten(1))))


TARGETS = [1, 0, 3]


@pytest.fixture
def x():
    return torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(9))


def test_lrp_zero_equals_gradient_times_input_on_relu_network(x):
    net = PlainNet().eval()
    lrp0 = attribute("lrp", net, x - 0.5, target=TARGETS, rule="zero")
    ixg = attribute("input-x-gradient", net, x - 0.5, target=TARGETS)
    assert torch.allclose(lrp0.raw, ixg.raw, atol=1e-7)
    small_eps = attribute("lrp", net, x - 0.5, target=TARGETS, rule="epsilon", epsilon=1e-9)
    assert torch.allclose(small_eps.raw, ixg.raw, atol=1e-6)
    assert ixg.raw.abs().sum() > 0


@pytest.mark.parametrize("ours, theirs", [("epsilon", "epsilon"), ("gamma", "gamma"), ("alpha1beta0", "alpha1beta0")])
def test_lrp_rules_match_captum(x, ours, theirs):
    captum = pytest.importorskip("captum.attr")
    rules = pytest.importorskip("captum.attr._utils.lrp_rules")
    net = PlainNet(bias=False).eval()
    ref_net = PlainNet(bias=False).eval()
    make = {"epsilon": lambda: rules.EpsilonRule(epsilon=0.1), "gamma": lambda: rules.GammaRule(gamma=0.3),
            "alpha1beta0": lambda: rules.Alpha1_Beta0_Rule()}[theirs]
    # γ on the convolutions only (followed by ReLUs): Captum amplifies W⁺ also for negative outputs,
    # convlens the contributions of the output's sign; they agree wherever relevance flows
    dense = rules.EpsilonRule if theirs == "gamma" else make
    for name in ("conv1", "conv2"):
        getattr(ref_net, name).rule = make()
    for name in ("fc1", "fc2"):
        getattr(ref_net, name).rule = dense(epsilon=0.1) if theirs == "gamma" else make()
    ref = captum.LRP(ref_net).attribute(x, target=TARGETS)
    composite = {"Conv2d": ours, "Linear": "epsilon" if theirs == "gamma" else ours}
    res = attribute("lrp", net, x, target=TARGETS, composite=composite, epsilon=0.1, gamma=0.3, stabilizer=1e-9)
    assert torch.allclose(res.raw, ref, atol=1e-6, rtol=1e-4)
    assert res.raw.abs().sum() > 0


def conv_t(s, weight, shape):
    """Wᵀ s for a padding-1 convolution (its input-gradient)."""
    return torch.nn.grad.conv2d_input(shape, weight, s, padding=1)


def top_relevance(net, x, rule_eps):
    """Relevance at conv1's output under ε on every later layer, written out layer by layer."""
    with torch.no_grad():
        z1 = net.conv1(x)
        a1 = net.pool(net.relu1(z1))
        z2 = net.conv2(a1)
        a2 = net.relu2(z2).flatten(1)
        z3 = net.fc1(a2)
        a3 = net.relu3(z3)
        z4 = net.fc2(a3)

    def stab(z):
        return z + rule_eps * torch.where(z >= 0, 1.0, -1.0)

    r4 = torch.zeros_like(z4)
    r4[range(len(x)), TARGETS] = z4[range(len(x)), TARGETS]
    r3 = a3 * ((r4 / stab(z4)) @ net.fc2.weight)
    r2 = a2 * ((r3 / stab(z3)) @ net.fc1.weight)
    r2 = r2.view_as(z2)
    s2 = r2 / stab(z2)
    r_a1 = a1 * conv_t(s2, net.conv2.weight, a1.shape)
    a1_pre = net.relu1(z1)  # max pool: the winner takes the relevance (its gradient)
    pooled = a1_pre.detach().requires_grad_(True)
    g = torch.autograd.grad(net.pool(pooled), pooled, grad_outputs=r_a1 / torch.where(a1 == 0, 1.0, a1))[0]
    return z1, a1_pre * g


def test_zbox_and_flat_first_layer_rules_written_out(x):
    net = PlainNet().eval()
    composite = {"Conv2d": "epsilon", "Linear": "epsilon"}
    z1, r1 = top_relevance(net, x, 0.25)
    w = net.conv1.weight
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    low, high = torch.zeros_like(x), torch.ones_like(x)
    zb = F.conv2d(x, w, padding=1) - F.conv2d(low, wp, padding=1) - F.conv2d(high, wn, padding=1)
    s = r1 / (zb + 1e-6 * torch.where(zb >= 0, 1.0, -1.0))
    want = x * conv_t(s, w, x.shape) - low * conv_t(s, wp, x.shape) - high * conv_t(s, wn, x.shape)
    res = attribute("lrp", net, x, target=TARGETS, composite={**composite, "first": "zbox"}, low=0.0, high=1.0)
    assert torch.allclose(res.raw, want, atol=1e-6)
    assert torch.allclose(res.raw.flatten(1).sum(1), r1.flatten(1).sum(1), atol=1e-5)  # z^B conserves

    count = F.conv2d(torch.ones_like(x), torch.ones_like(w), padding=1)
    want_flat = conv_t(r1 / (count + 1e-6), torch.ones_like(w), x.shape)
    flat = attribute("lrp", net, x, target=TARGETS, composite={**composite, "first": "flat"})
    assert torch.allclose(flat.raw, want_flat, atol=1e-6)


def test_alpha2beta1_conserves_on_bias_free_layers(x):
    net = PlainNet(bias=False).eval()
    res = attribute("lrp", net, x - 0.5, target=TARGETS, rule="alpha2beta1")
    with torch.no_grad():
        y = net(x - 0.5)[range(3), TARGETS]
    assert torch.allclose(res.raw.flatten(1).sum(1), y, rtol=1e-3, atol=1e-5)
    plain = attribute("lrp", net, x - 0.5, target=TARGETS, rule="epsilon")
    assert not torch.allclose(res.raw, plain.raw, atol=1e-4)


class BnNet(nn.Module):
    def __init__(self, fold: bool = False):
        super().__init__()
        torch.manual_seed(12)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        h = torch.relu_(self.bn1(self.conv1(x)))
        return self.fc(F.relu6(self.bn2(self.conv2(h))).mean((2, 3)))


def folded_twin(net: BnNet) -> nn.Module:
    """The same network with each BatchNorm folded into its convolution by hand (no BatchNorm left)."""
    twin = BnNet().eval()
    twin.load_state_dict(net.state_dict())
    for conv, bn in ((twin.conv1, twin.bn1), (twin.conv2, twin.bn2)):
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.data = conv.weight.data * s[:, None, None, None]
        conv.bias = nn.Parameter((b - bn.running_mean) * s + bn.bias)
        bn.forward = lambda t: t
    return twin


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_canonization_equals_hand_folded_network_and_restores_exactly(x, composite):
    net = BnNet().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layouts = {k: v.stride() for k, v in net.state_dict().items()}
    res = attribute("lrp", net, x, target=TARGETS, composite=composite, low=0.0, high=1.0)
    ref = attribute("lrp", folded_twin(net), x, target=TARGETS, composite=composite, low=0.0, high=1.0,
                    canonize=False)
    assert torch.allclose(res.raw, ref.raw, atol=1e-5, rtol=1e-4), composite
    assert res.raw.abs().sum() > 0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].stride() == layouts[k] for k in before)
    assert net.conv1.bias is None and count_hooks(net) == 0


def test_canonization_changes_the_result(x):
    net = BnNet().eval()
    folded = attribute("lrp", net, x, target=TARGETS, composite="epsilon-plus")
    unfolded = attribute("lrp", net, x, target=TARGETS, composite="epsilon-plus", canonize=False)
    assert float((folded.raw - unfolded.raw).abs().max()) > 0.1 * float(folded.raw.abs().max())


def test_inplace_relus_give_the_same_relevance(x):
    plain, inplace = PlainNet().eval(), PlainNet(inplace=True).eval()
    inplace.load_state_dict(plain.state_dict())
    for composite in ("epsilon-gamma-box", "epsilon-alpha2-beta1"):
        a = attribute("lrp", plain, x, target=TARGETS, composite=composite)
        b = attribute("lrp", inplace, x, target=TARGETS, composite=composite)
        assert torch.allclose(a.raw, b.raw, atol=1e-7)


@pytest.mark.parametrize("options, fragment", [
    ({"composite": {"Linear": "epsilon", "Conv2d": "gamma"}}, "has no Linear layer"),
    ({"composite": {"Conv3d": "gamma"}}, "layer type 'Conv3d'"),
    ({"composite": {"Conv2d": "zbox"}}, "cannot apply"),
    ({"composite": "nope"}, "unknown LRP composite"),
    ({"rule": "magic"}, "unknown LRP rule"),
])
def test_bad_composites(options, fragment):
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConvlensError, match=fragment):
        make_method("lrp", conv_only, **options)


def test_lrp_class_default_runs_on_conv_only_model(x):
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    res = LRP(conv_only).attribute(x, 2)
    assert res.raw.abs().sum() > 0


def test_gamma_never_crosses_zero_with_mixed_sign_inputs():
    """Inputs of both signs (a linear bottleneck): the γ denominators keep the sign of z, so the relevance
    stays bounded where W + γW⁺ alone would divide by values near zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = attribute("lrp", net, x, target=0, composite={"Conv2d": "gamma", "Linear": "epsilon"}, gamma=0.5)
    eps = attribute("lrp", net, x, target=0, composite={"Conv2d": "epsilon", "Linear": "epsilon"}, epsilon=1e-9)
    assert float(res.raw.abs().max()) < 10 * float(eps.raw.abs().max())
    with torch.no_grad():
        z = net[0](x)
    assert bool((z < 0).any()) and bool((x < 0).any())
