"""Perturbation methods against Captum 0.9.0 (same inputs, masks, seeds) and against exact enumerations."""
import itertools
import math

import pytest
import torch
from torch import nn

from convlens.attribution import attribute, make_method
from convlens.attribution.perturbation import RISE, KernelSHAP
from convlens.attribution.segment import grid_labels, slic_labels
from convlens.errors import ConvlensError


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_max_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


TARGETS = [0, 3, 1]


@pytest.fixture
def net():
    return SmallNet().eval()


@pytest.fixture
def x():
    return torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))


def attribute_counting_forwards(method, net, x):
    """The method's result on (x, TARGETS) and the batch size of every forward of ``net`` it ran."""
    calls = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        return method.attribute(x, TARGETS), calls
    finally:
        handle.remove()


def test_occlusion_matches_captum(net, x):
    captum = pytest.importorskip("captum.attr")
    ref = captum.Occlusion(net).attribute(x, sliding_window_shapes=(3, 5, 5), strides=(3, 3, 3), baselines=0.2,
                                          target=TARGETS)
    ours = attribute("occlusion", net, x, target=TARGETS, window=5, stride=3, baseline=0.2, batch_size=7)
    assert torch.allclose(ours.raw, ref[:, 0], atol=1e-5)
    assert torch.allclose(ref[:, 0], ref[:, 2])
    assert ours.raw.abs().sum() > 0


def test_occlusion_skips_windows_already_at_baseline(net, x):
    x = x.clone()
    x[:, :, :6] = 0.0  # the top half equals the baseline: those windows need no forward
    method = make_method("occlusion", net, window=3, stride=3)
    res, calls = attribute_counting_forwards(method, net, x)
    assert sum(calls) == len(x) * (1 + 8)  # the clean forward + the 8 windows of the lower half
    assert (res.raw[:, :6] == 0).all() and res.raw[:, 6:].abs().sum() > 0


def test_feature_ablation_matches_captum_on_grid_and_superpixels(net, x):
    captum = pytest.importorskip("captum.attr")
    for features in ("grid", "slic"):
        method = make_method("feature-ablation", net, features=features, cells=3, segments=6, baseline=0.1)
        labels = method.labels(x)
        ref = captum.FeatureAblation(net).attribute(x, baselines=0.1, target=TARGETS,
                                                    feature_mask=labels[:, None].expand_as(x).contiguous())
        ours = method.attribute(x, TARGETS)
        assert torch.allclose(ours.raw, ref[:, 0], atol=1e-5), features
        assert ours.raw.abs().sum() > 0


def test_shapley_sampling_matches_captum_same_seed(net, x):
    captum = pytest.importorskip("captum.attr")
    labels = grid_labels(len(x), 12, 12, 3)
    torch.manual_seed(5)
    ref = captum.ShapleyValueSampling(net).attribute(x, baselines=0.0, target=TARGETS, n_samples=3,
                                                     feature_mask=labels[:, None].expand_as(x).contiguous())
    ours = attribute("shapley-sampling", net, x, target=TARGETS, cells=3, permutations=3, seed=5, batch_size=10)
    assert torch.allclose(ours.raw, ref[:, 0], atol=1e-5)
    # efficiency: Σ_f φ_f = y(x) − y(baseline), whatever the orders
    with torch.no_grad():
        gap = net(x)[range(3), TARGETS] - net(torch.zeros_like(x))[range(3), TARGETS]
    sums = torch.stack([torch.zeros(9).index_add_(0, labels[n].flatten(), ours.raw[n].flatten()) /
                        torch.bincount(labels[n].flatten()) for n in range(3)]).sum(1)
    assert torch.allclose(sums, gap, atol=1e-5)


def exact_shapley(value, f: int) -> torch.Tensor:
    """φ_i = Σ_{S ⊆ F∖i} |S|!(F−|S|−1)!/F! (v(S∪i) − v(S)), by enumeration."""
    phi = torch.zeros(f, dtype=torch.double)
    for i in range(f):
        others = [j for j in range(f) if j != i]
        for r in range(f):
            for subset in itertools.combinations(others, r):
                weight = math.factorial(r) * math.factorial(f - r - 1) / math.factorial(f)
                phi[i] += weight * (value(set(subset) | {i}) - value(set(subset)))
    return phi


def test_kernel_shap_enumerated_equals_exact_shapley_values(net, x):
    labels = grid_labels(1, 12, 12, 2)[0]  # 4 features: 14 coalitions are enumerated

    def value(n, subset):
        keep = torch.zeros(12, 12)
        for f in subset:
            keep[labels == f] = 1
        with torch.no_grad():
            return float(net((x[n] * keep)[None])[0, TARGETS[n]])

    ours = attribute("kernel-shap", net, x, target=TARGETS, cells=2, samples=14)
    for n in range(len(x)):
        phi = exact_shapley(lambda s: value(n, s), 4)
        assert torch.allclose(ours.raw[n], phi.float()[labels], atol=1e-5)
    assert ours.raw.abs().sum() > 0


def test_kernel_shap_sampled_keeps_efficiency(net, x):
    res = attribute("kernel-shap", net, x, target=TARGETS, cells=4, samples=40, seed=3)
    labels = grid_labels(1, 12, 12, 4)[0]
    per_feature = torch.stack([torch.zeros(16).index_add_(0, labels.flatten(), res.raw[n].flatten()) /
                               torch.bincount(labels.flatten()) for n in range(3)])
    with torch.no_grad():
        gap = net(x)[range(3), TARGETS] - net(torch.zeros_like(x))[range(3), TARGETS]
    assert torch.allclose(per_feature.sum(1), gap, atol=1e-4)
    z, w = KernelSHAP(net, samples=40, seed=3).coalitions(16, "cpu")
    assert z.shape == (40, 16) and (z.sum(1) > 0).all() and (z.sum(1) < 16).all() and (w == 1).all()


class LinearModel(nn.Module):
    """y = Σ W ⊙ x + b: its score is linear in which superpixels are kept (baseline 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.weight = nn.Parameter(torch.randn(4, 3, 12, 12))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x[:, None] * self.weight).flatten(2).sum(2) + self.bias


def test_lime_recovers_a_linear_models_segment_contributions(x):
    model = LinearModel().eval()
    res = attribute("lime", model, x, target=[0, 1, 2], segments=6, samples=64, ridge=0.0)
    labels = slic_labels(x, 6)
    for n, c in enumerate([0, 1, 2]):
        contribution = (model.weight[c] * x[n]).sum(0).detach()
        for f in labels[n].unique():
            inside = labels[n] == f
            assert torch.allclose(res.raw[n][inside], contribution[inside].sum().expand(int(inside.sum())), atol=1e-4)


def test_lime_weights_and_first_sample():
    method = make_method("lime", LinearModel(), samples=10, kernel_width=0.5)
    z = method.coalitions(4, "cpu")
    assert z[0].all()
    w = method.weights(torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool))
    assert torch.allclose(w, torch.exp(-torch.tensor([0.0, 0.5]) ** 2 / 0.25).double())


def test_rise_formula_with_its_masks(net, x):
    method = RISE(net, masks=20, cells=3, p=0.4, seed=4, batch_size=16)
    masks = method.make_masks(12, 12)
    assert masks.shape == (20, 12, 12) and 0 <= masks.min() and masks.max() <= 1
    res = method.attribute(x, TARGETS)
    with torch.no_grad():
        want = torch.stack([sum(torch.softmax(net((x[n] * m)[None]), 1)[0, TARGETS[n]] * m for m in masks)
                            for n in range(3)]) / (20 * 0.4)
    assert torch.allclose(res.raw, want, atol=1e-5)
    assert not torch.allclose(masks[0], masks[1])


def test_slic_follows_a_colour_edge():
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0, :, 9:] = 1.0  # red right part, edge off the grid lines
    labels = slic_labels(img, segments=4, compactness=1.0)[0]
    for f in labels.unique():
        cols = (labels == f).nonzero()[:, 1]
        assert bool((cols < 9).all()) or bool((cols >= 9).all())
    assert len(labels.unique()) >= 2


@pytest.mark.parametrize("options, fragment", [
    ({"window": 13}, "larger than the input"),
    ({"window": 2, "stride": 3}, "leaves pixels out"),
])
def test_occlusion_bad_geometry(net, x, options, fragment):
    with pytest.raises(ConvlensError, match=fragment):
        attribute("occlusion", net, x, **options)


@pytest.mark.parametrize("name, options", [("rise", {"masks": 0}), ("kernel-shap", {"samples": 0}),
                                           ("lime", {"samples": 0}), ("shapley-sampling", {"permutations": 0})])
def test_zero_samples_rejected(net, name, options):
    with pytest.raises(ConvlensError):
        make_method(name, net, **options)


def test_occlusion_window_as_fraction(net, x):
    frac = attribute("occlusion", net, x, target=TARGETS, window=0.25, stride=0.25)
    pixels = attribute("occlusion", net, x, target=TARGETS, window=3, stride=3)
    assert torch.equal(frac.raw, pixels.raw)


def test_repeated_coalitions_are_scored_once(net, x):
    """32 random draws over 4 features repeat coalitions: each distinct one costs one forward per image (the
    full one none), and the fit is the fit of all 32 draws scored one by one."""
    method = make_method("lime", net, features="grid", cells=2, samples=32, seed=1)
    z = method.coalitions(4, "cpu")
    distinct = torch.unique(z, dim=0)
    assert len(distinct) < len(z)
    res, calls = attribute_counting_forwards(method, net, x)
    assert sum(calls) == len(x) * (1 + int((~distinct.all(1)).sum()))
    labels = grid_labels(1, 12, 12, 2)[0]
    for n in range(len(x)):
        with torch.no_grad():
            y = torch.stack([net((x[n] * row[labels].float())[None])[0, TARGETS[n]] for row in z])
        assert torch.allclose(res.raw[n], method.fit(z, y)[labels], atol=1e-5)
