"""Noise tunnel over any method: zero-noise identities and the statistics written out with the same draws."""
import pytest
import torch
from torch import nn

from convlens.attribution import METHODS, attribute, make_method, method_info, uses_layer
from convlens.errors import ConvlensError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


TARGETS = [0, 3, 1]


@pytest.fixture
def net():
    return Net().eval()


@pytest.fixture
def x():
    return torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("base", ["gradcam", "saliency", "lrp", "occlusion", "deeplift"])
def test_zero_noise_gives_the_base_method(net, x, base):
    ref = attribute(base, net, x, target=TARGETS)
    mean = attribute(f"smoothgrad:{base}", net, x, target=TARGETS, samples=2, sigma=0.0)
    sq = attribute(f"smoothgrad-sq:{base}", net, x, target=TARGETS, samples=2, sigma=0.0)
    var = attribute(f"vargrad:{base}", net, x, target=TARGETS, samples=2, sigma=0.0)
    assert torch.allclose(mean.raw, ref.raw, atol=1e-6) and torch.allclose(mean.maps, ref.maps, atol=1e-6)
    assert torch.allclose(sq.raw, ref.raw ** 2, atol=1e-6) and torch.allclose(sq.maps, ref.maps ** 2, atol=1e-6)
    assert float(var.raw.abs().max()) < 1e-6 * max(1.0, float(ref.raw.abs().max()) ** 2)
    assert ref.maps.abs().sum() > 0


def test_statistics_over_the_same_noisy_copies(net, x):
    samples, sigma, seed = 4, 0.2, 3
    span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.randn(x.shape[1:], generator=gen) for _ in range(samples)])[:, None] * sigma * span
    maps = torch.stack([attribute("gradcam", net, x + e, target=TARGETS).maps for e in noise])
    options = dict(samples=samples, sigma=sigma, seed=seed, batch_size=6)  # 2 copies of the batch per chunk
    assert torch.allclose(attribute("smoothgrad:gradcam", net, x, TARGETS, **options).maps, maps.mean(0), atol=1e-6)
    assert torch.allclose(attribute("smoothgrad-sq:gradcam", net, x, TARGETS, **options).maps,
                          maps.pow(2).mean(0), atol=1e-6)
    assert torch.allclose(attribute("vargrad:gradcam", net, x, TARGETS, **options).maps,
                          maps.var(0, unbiased=False), atol=1e-6)
    assert maps.var(0).sum() > 0


def test_score_function_target_through_the_tunnel(net, x):
    fn = attribute("smoothgrad:gradcam", net, x, target=lambda s: s[:, 2], samples=3)
    cls = attribute("smoothgrad:gradcam", net, x, target=2, samples=3)
    assert torch.allclose(fn.maps, cls.maps, atol=1e-6)
    assert fn.targets.tolist() == [-1, -1, -1]


def test_registry_names_and_options(net):
    assert {"smoothgrad", "smoothgrad-sq", "vargrad"} <= set(METHODS)
    assert uses_layer("smoothgrad:gradcam") and not uses_layer("vargrad:saliency")
    info = method_info("smoothgrad:integrated-gradients")
    assert info.signed and not method_info("vargrad:integrated-gradients").signed
    method = make_method("vargrad:scorecam", net, layer="act2", samples=2, batch_size=4)
    assert method.method.batch_size == 8 and method.batch_size == 4 and method.method.layer == "act2"
    for bad in ("noisy:gradcam", "smoothgrad:nope"):
        with pytest.raises(ConvlensError):
            make_method(bad, net)
    with pytest.raises(ConvlensError):
        make_method("smoothgrad:gradcam", net, samples=0)


def test_batched_equals_per_image_with_noise(net, x):
    batched = attribute("vargrad:gradcam", net, x, target=TARGETS, samples=3, batch_size=4)
    for i in range(len(x)):
        single = attribute("vargrad:gradcam", net, x[i:i + 1], target=TARGETS[i], samples=3, batch_size=64)
        assert torch.allclose(single.maps, batched.maps[i:i + 1], atol=1e-7)


@pytest.mark.parametrize("target, clean_rows", [(TARGETS, 1), (None, 3), (lambda s: s[:, 2], 3)])
def test_clean_pass_before_the_copies(net, x, target, clean_rows):
    """Class indices need one image's scores (the class count), the prediction and a score function the batch's."""
    rows = []
    handle = net.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    try:
        attribute("smoothgrad-sq", net, x, target=target, samples=2, batch_size=6)
        with pytest.raises(ConvlensError, match="out of range"):
            attribute("vargrad", net, x, target=[0, 9, 1], samples=2)
    finally:
        handle.remove()
    assert rows == [clean_rows, 6, 1]  # the clean pass, the copies; the bad class refused after one image
