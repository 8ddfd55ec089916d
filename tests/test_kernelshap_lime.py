"""KernelSHAP and LIME against Captum 0.9.0's KernelShap and Lime (scikit-learn fits), on the same model,
inputs, feature masks, baseline and coalitions.

Captum draws its coalitions with the global RNG one at a time, so its draws cannot be matched by seed;
both samplers take a generator function (Captum's ``perturb_func``), so Captum is fed ours. What is then
compared is the regression on the same samples:

* KernelSHAP, all 2^F coalitions: the Shapley-kernel weighted fit with Σφ = y(x) − y(b) has one answer,
  the exact Shapley values. Captum's sampler draws with replacement (it cannot enumerate) and weighs
  every drawn coalition 1, the kernel being realized by how often a size is drawn; fed the enumeration,
  it is given the kernel π(z) = (F − 1)/(C(F, |z|)·|z|·(F − |z|)) as its similarity, and its own weight
  10⁶ on the full and empty coalitions (its soft form of the two constraints).
* KernelSHAP, sampled: our draws (sizes ∝ the kernel's mass per size, members uniform — Captum's scheme)
  through Captum's KernelShap unchanged otherwise (weights 1, 10⁶ on the ends, LinearRegression).
* LIME: our coalitions, our kernel exp(−D²/σ²) with D the cosine distance of z to the full coalition
  (the paper's π; Captum's default measures the distance between the perturbed images and fits a Lasso),
  and sklearn's Ridge(α) (LinearRegression for α = 0) with an unpenalized intercept.

Captum fits in float32 and keeps the ends as weights of 10⁶ instead of constraints: agreement to ~1e-4
relative, not bit-exact.
"""
import math

import pytest
import torch
from captum._utils.models.linear_model import SkLearnLinearRegression, SkLearnRidge
from captum.attr import KernelShap, Lime

from convlens.attribution import attribute, make_method
from convlens.attribution.perturbation import KernelSHAP
from convlens.attribution.segment import grid_labels
from test_perturbation import TARGETS, net, x  # noqa: F401 (fixtures shared with the perturbation tests)

pytestmark = pytest.mark.filterwarnings("ignore:You are providing multiple inputs")  # Captum, per-example fits


def feeding(rows: torch.Tensor, ends: bool):
    """A Captum ``perturb_func`` yielding the given (S, F) coalitions (after the full and the empty one
    when ``ends``, as Captum's KernelShap sampler does)."""
    def generator(_inputs, **_kwargs):
        f = rows.shape[1]
        if ends:
            yield torch.ones(1, f, dtype=torch.long)
            yield torch.zeros(1, f, dtype=torch.long)
        for row in rows:
            yield row[None].long()
    return generator


def every_coalition(f: int) -> torch.Tensor:
    """All 2^F − 2 coalitions that are neither empty nor full, (S, F) bool."""
    codes = torch.arange(1, 2 ** f - 1)
    return ((codes[:, None] >> torch.arange(f)) & 1).bool()


def shapley_kernel(f: int, end_weight: float):
    """Captum similarity: π(z) = (F − 1)/(C(F, |z|)·|z|·(F − |z|)), scaled to a mean of 1 over the 2^F − 2
    coalitions (as Captum's own weights are 1; a common factor leaves the constrained fit unchanged);
    ``end_weight`` for |z| ∈ {0, F}."""
    total = sum((f - 1) / (k * (f - k)) for k in range(1, f))  # Σ_z π(z): C(F, k) coalitions of size k

    def similarity(_inputs, _perturbed, z, **_kwargs):
        k = int(z.sum())
        weight = end_weight if k in (0, f) else (f - 1) / (math.comb(f, k) * k * (f - k)) * (2 ** f - 2) / total
        return torch.tensor([weight])
    return similarity


def lime_kernel(width: float):
    """Captum similarity: exp(−D²/σ²), D = 1 − cos(z, 1), the cosine distance to the full coalition
    (1 for the empty one)."""
    def similarity(_inputs, _perturbed, z, **_kwargs):
        zd = z.double().flatten()
        distance = 1 - zd.sum() / (max(float(zd.norm()), 1e-12) * math.sqrt(len(zd)))
        return torch.tensor([math.exp(-float(distance) ** 2 / width ** 2)])
    return similarity


def captum_feature_mask(labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return labels[:, None].expand_as(x).contiguous()


def test_kernel_shap_enumerated_equals_captums_fit_of_every_coalition(net, x):
    labels = grid_labels(len(x), 12, 12, 3)  # 9 features: 510 coalitions
    ours = attribute("kernel-shap", net, x, target=TARGETS, cells=3, samples=510, baseline=0.2)
    captum = KernelShap(net)
    captum.perturb_func = feeding(every_coalition(9), ends=True)
    captum.similarity_func = shapley_kernel(9, captum.inf_weight)
    ref = captum.attribute(x, baselines=0.2, target=TARGETS, feature_mask=captum_feature_mask(labels, x),
                           n_samples=512, perturbations_per_eval=64)
    assert ours.raw.abs().max() > 1e-2
    assert torch.allclose(ours.raw, ref[:, 0], atol=2e-5 * float(ref.abs().max()))  # measured 1e-7 of 0.09
    assert torch.equal(ref[:, 0], ref[:, 2])  # one value per feature, every channel alike
    # the unique answer is exact: Σ over features = y(x) − y(baseline) (efficiency)
    with torch.no_grad():
        gap = net(x)[range(3), TARGETS] - net(torch.full_like(x, 0.2))[range(3), TARGETS]
    per_feature = torch.stack([torch.zeros(9).index_add_(0, labels[n].flatten(), ours.raw[n].flatten())
                               / torch.bincount(labels[n].flatten()) for n in range(3)])
    assert torch.allclose(per_feature.sum(1), gap, atol=1e-5)


def test_kernel_shap_on_superpixels_equals_captum_image_by_image(net, x):
    """SLIC superpixels: each image its own features (Captum counts them over the batch, so one call per
    image); all 2^F coalitions of each."""
    method = make_method("kernel-shap", net, features="slic", segments=6, samples=254, baseline=0.1)
    ours = method.attribute(x, TARGETS)
    labels = method.labels(x)
    for n in range(len(x)):
        f = int(labels[n].max()) + 1
        assert 2 ** f - 2 <= 254, f  # enumerated
        captum = KernelShap(net)
        captum.perturb_func = feeding(every_coalition(f), ends=True)
        captum.similarity_func = shapley_kernel(f, captum.inf_weight)
        ref = captum.attribute(x[n:n + 1], baselines=0.1, target=TARGETS[n], n_samples=2 ** f,
                               feature_mask=captum_feature_mask(labels[n:n + 1], x[n:n + 1]),
                               perturbations_per_eval=64)
        assert ours.raw[n].abs().max() > 1e-2
        assert torch.allclose(ours.raw[n], ref[0, 0], atol=2e-5 * float(ref.abs().max())), n


@pytest.mark.parametrize("samples, seed", [(40, 3), (200, 0)])
def test_kernel_shap_sampled_equals_captum_on_the_same_draws(net, x, samples, seed):
    labels = grid_labels(len(x), 12, 12, 4)  # 16 features: sampled, not enumerated
    ours = attribute("kernel-shap", net, x, target=TARGETS, cells=4, samples=samples, seed=seed)
    z, weights = KernelSHAP(net, samples=samples, seed=seed).coalitions(16, "cpu")
    assert (weights == 1).all()  # unweighted, as Captum's fit of its draws
    captum = KernelShap(net)
    captum.perturb_func = feeding(z, ends=True)
    ref = captum.attribute(x, baselines=0.0, target=TARGETS, feature_mask=captum_feature_mask(labels, x),
                           n_samples=samples + 2, perturbations_per_eval=64)
    assert ours.raw.abs().max() > 1e-2
    assert torch.allclose(ours.raw, ref[:, 0], atol=1e-4 * float(ref.abs().max()))  # measured 2e-6 of 0.09


def test_kernel_shap_draws_sizes_as_captums_sampler():
    """Captum draws |z| = k with p(k) ∝ (F − 1)/(k(F − k)), then k members uniformly; ours the same."""
    f, samples = 16, 20000  # 2^16 − 2 > 20000: sampled
    z, _ = KernelSHAP(None, samples=samples, seed=1).coalitions(f, "cpu")
    sizes = torch.bincount(z.sum(1), minlength=f + 1).double() / samples
    k = torch.arange(1, f, dtype=torch.double)
    expected = (f - 1) / (k * (f - k))
    assert sizes[0] == 0 and sizes[f] == 0
    assert torch.allclose(sizes[1:f], expected / expected.sum(), atol=0.01)
    # members uniform given the size: every feature is in a coalition with probability E|z|/F = 1/2
    assert torch.allclose(z.double().mean(0), torch.full((f,), 0.5, dtype=torch.double), atol=0.015)


@pytest.mark.parametrize("ridge", [1.0, 0.0])
def test_lime_equals_captum_with_the_same_samples_kernel_and_ridge(net, x, ridge):
    method = make_method("lime", net, features="slic", segments=6, samples=48, ridge=ridge, kernel_width=0.5,
                         baseline=0.1)
    ours = method.attribute(x, TARGETS)
    labels = method.labels(x)
    assert ours.raw.abs().max() > 1e-3
    for n in range(len(x)):  # one image at a time: Captum counts the features over the whole batch
        f = int(labels[n].max()) + 1
        model = SkLearnRidge(alpha=ridge) if ridge > 0 else SkLearnLinearRegression()
        captum = Lime(net, interpretable_model=model, similarity_func=lime_kernel(0.5),
                      perturb_func=feeding(method.coalitions(f, "cpu"), ends=False))
        ref = captum.attribute(x[n:n + 1], baselines=0.1, target=TARGETS[n], n_samples=48,
                               feature_mask=captum_feature_mask(labels[n:n + 1], x[n:n + 1]),
                               perturbations_per_eval=16)
        assert torch.allclose(ours.raw[n], ref[0, 0], atol=1e-5 * float(ref.abs().max()) + 1e-7), n


def test_lime_on_a_grid_batch_equals_captum_per_example(net, x):
    """A grid gives every image the same features and coalitions: the broadcast path, three fits."""
    labels = grid_labels(len(x), 12, 12, 3)
    ours = attribute("lime", net, x, target=TARGETS, features="grid", cells=3, samples=40, seed=4)
    captum = Lime(net, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel(0.25),
                  perturb_func=feeding(make_method("lime", net, samples=40, seed=4).coalitions(9, "cpu"), ends=False))
    ref = captum.attribute(x, baselines=0.0, target=TARGETS, n_samples=40, perturbations_per_eval=40,
                           feature_mask=captum_feature_mask(labels, x))
    assert ours.raw.abs().max() > 1e-3
    assert torch.allclose(ours.raw, ref[:, 0], atol=1e-5 * float(ref.abs().max()))
