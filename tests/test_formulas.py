"""Each method against its paper's formula written out here, or a reference library (issue 10 seams)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import SmoothGrad, make_method


class Net(nn.Module):
    """conv → ReLU → conv → ReLU (the layer) → conv 1×1 → ReLU → GAP → linear (not a CAM head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        self.conv3, self.act3 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.act3(self.conv3(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    return Net().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(4))


TARGETS = [1, 4, 0]


def acts_and_grads(net, x):
    """A (N, K, h, w) at act2 and ∂y_c/∂A, computed without convlens."""
    a = net.act2(net.conv2(net.act1(net.conv1(x)))).detach().requires_grad_(True)
    y = net.fc(net.act3(net.conv3(a)).mean((2, 3)))
    g = torch.autograd.grad(y[range(len(x)), TARGETS].sum(), a)[0]
    return a.detach().double(), g.double()


def test_gradcam_plus_plus_formula(net, x):
    """Chattopadhay et al. eq. 19 with exp(S): α^kc_ij = g² / (2g² + Σ_ab A^k_ab g³);
    w^c_k = Σ_ij α^kc_ij ReLU(g_ij); L = ReLU(Σ_k w_k A^k)."""
    a, g = acts_and_grads(net, x)
    expected = torch.zeros(a.shape[0], a.shape[2], a.shape[3], dtype=torch.float64)
    for n in range(a.shape[0]):
        for k in range(a.shape[1]):
            s = a[n, k].sum()
            w = 0.0
            for i in range(a.shape[2]):
                for j in range(a.shape[3]):
                    gij = g[n, k, i, j]
                    denom = 2 * gij ** 2 + s * gij ** 3
                    alpha = gij ** 2 / denom if denom != 0 else 0.0
                    w += alpha * max(float(gij), 0.0)
            expected[n] += w * a[n, k]
    res = make_method("gradcam++", net, layer="act2").attribute(x, TARGETS)
    assert torch.allclose(res.raw.double(), F.relu(expected), rtol=1e-4, atol=1e-7)


def test_xgradcam_formula(net, x):
    """Fu et al. 2020: w_k = Σ_ij (A^k_ij / Σ_ab A^k_ab) ∂y/∂A^k_ij; L = ReLU(Σ_k w_k A^k)."""
    a, g = acts_and_grads(net, x)
    expected = torch.zeros(a.shape[0], a.shape[2], a.shape[3], dtype=torch.float64)
    for n in range(a.shape[0]):
        for k in range(a.shape[1]):
            s = float(a[n, k].sum())
            w = float((a[n, k] / s * g[n, k]).sum()) if s != 0 else 0.0
            expected[n] += w * a[n, k]
    res = make_method("xgradcam", net, layer="act2").attribute(x, TARGETS)
    assert torch.allclose(res.raw.double(), F.relu(expected), rtol=1e-4, atol=1e-7)


def test_layercam_formula(net, x):
    """Jiang et al. 2021: L_ij = ReLU(Σ_k ReLU(∂y/∂A^k_ij) · A^k_ij)."""
    a, g = acts_and_grads(net, x)
    expected = torch.zeros(a.shape[0], a.shape[2], a.shape[3], dtype=torch.float64)
    for n in range(a.shape[0]):
        for i in range(a.shape[2]):
            for j in range(a.shape[3]):
                expected[n, i, j] = max(0.0, sum(max(float(g[n, k, i, j]), 0.0) * float(a[n, k, i, j])
                                                 for k in range(a.shape[1])))
    res = make_method("layercam", net, layer="act2").attribute(x, TARGETS)
    assert torch.allclose(res.raw.double(), expected, rtol=1e-4, atol=1e-7)


def test_gradcam_equals_captum(net, x):
    captum = pytest.importorskip("captum.attr")
    theirs = captum.LayerGradCam(net, net.act2).attribute(x, target=TARGETS, relu_attributions=True)[:, 0]
    ours = make_method("gradcam", net, layer="act2").attribute(x, TARGETS)
    assert torch.allclose(ours.raw, theirs.detach(), rtol=1e-5, atol=1e-7)
    assert float(ours.raw.abs().sum()) > 0


@pytest.mark.parametrize("name", ["saliency", "guided-backprop", "input-x-gradient", "integrated-gradients",
                                  "gradcam", "layercam", "guided-gradcam", "scorecam"])
def test_smoothgrad_with_one_noiseless_sample_is_its_base_method(net, x, name):
    base = make_method(name, net, **({"steps": 8} if name == "integrated-gradients" else {}))
    smooth = SmoothGrad(base, samples=1, sigma=0.0).attribute(x, TARGETS)
    plain = base.attribute(x, TARGETS)
    assert torch.equal(smooth.raw, plain.raw) and torch.equal(smooth.maps, plain.maps)
    assert smooth.targets.tolist() == TARGETS and smooth.method == f"smoothgrad-{name}"


class _HandGuidedReLU6(torch.autograd.Function):
    """Guided backprop through ReLU6, written here: y = min(max(x, 0), 6); dx = ReLU(dy)·[0 < x < 6]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * ((x > 0) & (x < 6)).to(grad)


class HandReLU6(nn.Module):
    def forward(self, x):
        return _HandGuidedReLU6.apply(x)


def test_guided_backprop_on_efficientnet_lite0_equals_a_hand_written_relu6_rule(lite0):
    from convlens.data.images import open_image, package_photos_dir

    model = lite0.model
    x = lite0.preprocess(open_image(package_photos_dir() / "coffee.png"))[None]
    hand = copy.deepcopy(model).eval()
    replaced = 0
    for name, module in list(hand.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, HandReLU6())
                replaced += 1
    assert replaced > 30
    xr = x.clone().requires_grad_(True)
    with torch.no_grad():
        target = int(model(x).argmax())
    expected = torch.autograd.grad(hand(xr)[0, target], xr)[0]
    ours = make_method("guided-backprop", model).attribute(x, target).raw
    scale = float(expected.abs().max())
    assert float((ours - expected).abs().max()) <= 1e-5 * scale
    vanilla = make_method("saliency", model).attribute(x, target).raw
    assert float((vanilla - expected).abs().max()) > 0.1 * scale  # the rule matters on this network
