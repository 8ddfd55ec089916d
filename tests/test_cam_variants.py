"""CAM-family additions: each map against its paper's formula written out here on a small conv net."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import attribute, make_method, normalize_maps
from convlens.attribution.cam_variants import FullGrad
from nets import GapNet


class FlatNet(nn.Module):
    """conv → ReLU → conv → ReLU (layer ``act2``) → flatten → linear: the gradient at A varies over space."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6 * 5 * 5, 4)

    def features(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))

    def head(self, a):
        return self.fc(a.flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


TARGETS = [0, 3, 1]


@pytest.fixture
def net():
    return FlatNet().eval()


@pytest.fixture
def x():
    return torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(5))


def acts_and_grads(net, x, targets):
    """A = layer output and g = ∂y^c/∂A computed here by plain autograd on the split network."""
    a = net.features(x).detach().requires_grad_(True)
    y = net.head(a)
    score = y.gather(1, torch.tensor(targets)[:, None]).sum()
    return a.detach(), torch.autograd.grad(score, a)[0], y.detach()


def test_hirescam_is_sum_of_gradient_times_activation(net, x):
    a, g, _ = acts_and_grads(net, x, TARGETS)
    res = attribute("hirescam", net, x, target=TARGETS, layer="act2")
    assert torch.allclose(res.raw, (g * a).sum(1), atol=1e-6)
    assert (res.raw < 0).any()  # signed, no ReLU


def test_hirescam_equals_gradcam_on_gap_linear_head(x):
    gap = GapNet().eval()
    hires = attribute("hirescam", gap, x, target=TARGETS, layer="act2")
    grad = attribute("gradcam", gap, x, target=TARGETS, layer="act2")
    assert torch.allclose(F.relu(hires.raw), grad.raw, atol=1e-7)
    assert grad.raw.abs().sum() > 0


def test_gradcam_elementwise_relu_inside_the_sum(net, x):
    a, g, _ = acts_and_grads(net, x, TARGETS)
    res = attribute("gradcam-elementwise", net, x, target=TARGETS, layer="act2")
    assert torch.allclose(res.raw, F.relu(g * a).sum(1), atol=1e-6)
    assert not torch.allclose(res.raw, F.relu((g * a).sum(1)), atol=1e-4)


def first_pc_map(m: np.ndarray) -> np.ndarray:
    """(K, h, w) → projection of the centred (hw, K) matrix on its first right singular vector."""
    k, h, w = m.shape
    mat = m.reshape(k, -1).T.astype(np.float64)
    mat = mat - mat.mean(0)
    _, _, vt = np.linalg.svd(mat, full_matrices=False)
    proj = mat @ vt[0]
    if (proj * mat.sum(1)).sum() < 0:
        proj = -proj
    return np.maximum(proj, 0).reshape(h, w)


def test_eigencam_and_eigengradcam_first_principal_component(net, x):
    a, g, _ = acts_and_grads(net, x, TARGETS)
    eig = attribute("eigencam", net, x, target=TARGETS, layer="act2")
    eg = attribute("eigengradcam", net, x, target=TARGETS, layer="act2")
    for i in range(len(x)):
        assert np.allclose(eig.raw[i].numpy(), first_pc_map(a[i].numpy()), atol=1e-5)
        assert np.allclose(eg.raw[i].numpy(), first_pc_map((g * a)[i].numpy()), atol=1e-6)
    assert eig.raw.abs().sum() > 0 and eg.raw.abs().sum() > 0


def test_ablationcam_weights_are_relative_score_drops(net, x):
    a, _, y = acts_and_grads(net, x, TARGETS)
    expected = torch.zeros(len(x), a.shape[1])
    for i, c in enumerate(TARGETS):
        for k in range(a.shape[1]):
            ablated = a[i:i + 1].clone()
            ablated[:, k] = 0
            expected[i, k] = (y[i, c] - net.head(ablated)[0, c]) / y[i, c]
    res = attribute("ablationcam", net, x, target=TARGETS, layer="act2", batch_size=4)
    want = F.relu((expected[:, :, None, None] * a).sum(1))
    assert torch.allclose(res.raw, want, atol=1e-5)
    assert res.raw.abs().sum() > 0
    # quick setting: only the 2 most active channels are scored, the others weigh 0
    top = a.mean((2, 3)).topk(2, dim=1).indices
    kept = torch.zeros_like(expected).scatter_(1, top, expected.gather(1, top))
    quick = attribute("ablationcam", net, x, target=TARGETS, layer="act2", max_channels=2)
    assert torch.allclose(quick.raw, F.relu((kept[:, :, None, None] * a).sum(1)), atol=1e-5)


def smoothgradcampp_weights(net, x, targets, noises):
    """Omeiza et al.: gradient powers averaged over the noisy copies x + noise; α and w from them."""
    a, _, _ = acts_and_grads(net, x, targets)
    powers = [torch.zeros_like(a) for _ in range(3)]
    for noise in noises:
        _, g, _ = acts_and_grads(net, x + noise, targets)
        for p in range(3):
            powers[p] += g ** (p + 1) / len(noises)
    d1, d2, d3 = powers
    alpha = torch.nan_to_num(d2 / (2 * d2 + (a * d3).sum((2, 3), keepdim=True)))
    return (alpha * F.relu(d1)).sum((2, 3))


def test_smoothgradcampp_formula(net, x):
    samples, sigma = 5, 0.3
    a, _, _ = acts_and_grads(net, x, TARGETS)
    span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(7)
    noises = torch.stack([torch.randn(x.shape[1:], generator=gen) for _ in range(samples)])[:, None] * sigma * span
    w = smoothgradcampp_weights(net, x, TARGETS, noises)
    res = attribute("smoothgradcam++", net, x, target=TARGETS, layer="act2", samples=samples, sigma=sigma, seed=7,
                    batch_size=6)
    assert torch.allclose(res.raw, F.relu((w[:, :, None, None] * a).sum(1)), atol=1e-5)
    assert res.raw.abs().sum() > 0


def test_smoothgradcampp_weights_match_torchcam(net, x):
    """TorchCAM 0.5.0 draws the same noise from the global generator; its weights are the paper's, but it
    combines them with the activations of the last noisy copy (ours: the clean input's, as in the paper)."""
    methods = pytest.importorskip("torchcam.methods")
    image = x[:1]
    torch.manual_seed(11)
    with methods.SmoothGradCAMpp(net, "act2", num_samples=1, std=0.5, input_shape=(3, 10, 10)) as extractor:
        ref = extractor(1, net(image), normalized=False)[0]
    noise = torch.randn((1, *image.shape), generator=torch.Generator().manual_seed(11)) * 0.5
    w = smoothgradcampp_weights(net, image, [1], noise)
    noisy_acts = net.features(image + noise[0]).detach()
    assert torch.allclose(F.relu((w[:, :, None, None] * noisy_acts).sum(1)), ref, atol=1e-5)


def score_masks(a_i: torch.Tensor, size) -> torch.Tensor:
    up = F.interpolate(a_i[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up))


def test_sscam_averages_softmax_over_noisy_masks(net, x):
    samples, sigma = 3, 0.25
    a, _, _ = acts_and_grads(net, x, TARGETS)
    res = attribute("sscam", net, x, target=TARGETS, layer="act2", samples=samples, sigma=sigma, seed=2)
    for i, c in enumerate(TARGETS):
        live = (a[i].flatten(1) != 0).any(1).nonzero().flatten()
        masks = score_masks(a[i, live], x.shape[-2:])
        noise = torch.randn((samples, *masks.shape), generator=torch.Generator().manual_seed(2)) * sigma
        alpha = torch.zeros(a.shape[1])
        with torch.no_grad():
            for s in range(samples):
                alpha[live] += F.softmax(net(x[i] * (masks + noise[s])[:, None]), 1)[:, c] / samples
        assert torch.allclose(res.raw[i], F.relu((alpha[:, None, None] * a[i]).sum(0)), atol=1e-5)
    assert res.raw.abs().sum() > 0


def test_iscam_integrates_the_mask_scale(net, x):
    samples = 4
    a, _, _ = acts_and_grads(net, x, TARGETS)
    res = attribute("iscam", net, x, target=TARGETS, layer="act2", samples=samples)
    for i, c in enumerate(TARGETS):
        masks = score_masks(a[i], x.shape[-2:])
        alpha = torch.zeros(a.shape[1])
        with torch.no_grad():
            for step in range(1, samples + 1):
                alpha += F.softmax(net(x[i] * (step / samples * masks)[:, None]), 1)[:, c] / samples
        alpha[(a[i].flatten(1) == 0).all(1)] = 0
        assert torch.allclose(res.raw[i], F.relu((alpha[:, None, None] * a[i]).sum(0)), atol=1e-5)


class BnNet(nn.Module):
    """conv → BN → ReLU → max pool → conv (no bias) → BN → ReLU → GAP → linear: piecewise linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
        self.fc = nn.Linear(7, 4)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_fullgrad_completeness_and_map(x):
    net = BnNet().eval()
    method = FullGrad(net)
    input_part, parts, explained, _ = method.decompose(x, TARGETS)
    assert set(parts) == {"conv1", "bn1", "bn2", "fc"}
    total = input_part.flatten(1).sum(1) + sum(p.flatten(1).sum(1) for p in parts.values())
    assert torch.allclose(total, explained, atol=1e-4)

    def psi(t):
        t = t.abs()
        t = t - t.flatten(1).min(1).values.view(-1, 1, 1, 1)
        return t / (t.flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-6)

    want = psi(input_part).sum(1)
    for name in ("conv1", "bn1", "bn2"):
        want = want + F.interpolate(psi(parts[name]), size=(10, 10), mode="bilinear", align_corners=True).sum(1)
    res = attribute("fullgrad", net, x, target=TARGETS)
    assert torch.allclose(res.maps, want, atol=1e-5)


class TokenReluNet(nn.Module):
    """Piecewise linear with linear layers on tokens (N, T, C), T ≠ C: their bias lies along the last axis."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Conv2d(3, 4, 5, stride=5)  # 10×10 → a 2×2 grid: T = 4 tokens
        self.up = nn.Linear(4, 6)                   # 6 features per token: T ≠ C
        self.mix = nn.Linear(4, 4)                  # across tokens, applied to (N, 6, 4)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        t = torch.relu(self.up(torch.relu(self.embed(x)).flatten(2).transpose(1, 2)))   # (N, 4, 6)
        t = torch.relu(self.mix(t.transpose(1, 2))).transpose(1, 2)                     # (N, 4, 6)
        return self.fc(t.mean(1))


def test_fullgrad_completeness_with_linear_layers_on_tokens(x):
    """y = Σ ∇_x y ⊙ x + Σ_layers Σ ∇_z y ⊙ b, each linear layer's bias on the axis it is added to."""
    net = TokenReluNet().eval()
    input_part, parts, explained, _ = FullGrad(net).decompose(x, TARGETS)
    assert set(parts) == {"embed", "up", "mix", "fc"} and parts["up"].shape == (3, 4, 6)
    total = input_part.flatten(1).sum(1) + sum(p.flatten(1).sum(1) for p in parts.values())
    assert torch.allclose(total, explained, atol=1e-4)
    assert attribute("fullgrad", net, x, target=TARGETS).maps.abs().sum() > 0


def test_fused_cam_is_mean_of_scaled_layer_maps(net, x):
    layers = ["act1", "act2"]
    fused = attribute("fusedcam", net, x, target=TARGETS, layer=",".join(layers))
    per_layer = [normalize_maps(attribute("gradcam", net, x, target=TARGETS, layer=l).maps) for l in layers]
    assert torch.allclose(fused.maps, torch.stack(per_layer).mean(0), atol=1e-6)
    assert fused.layer == "act1,act2"
    default = make_method("fusedcam", net).layers(x)
    assert default == ["act1", "act2"]
