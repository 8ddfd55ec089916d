import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import METHODS, attribute, make_method, normalize_maps
from convlens.attribution.cam import ScoreCAM
from convlens.attribution.gradient import IntegratedGradients
from convlens.errors import ConvlensError
from convlens.hooks import count_hooks
from nets import GapNet


@pytest.fixture
def gapnet():
    return GapNet().eval()


@pytest.fixture
def images():
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_gradcam_equals_cam_over_hw_on_gap_linear_head(gapnet, images):
    cam = attribute("cam", gapnet, images, target=2, layer="act2")
    grad = attribute("gradcam", gapnet, images, target=2, layer="act2")
    assert torch.allclose(grad.raw, F.relu(cam.raw) / (12 * 12), atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batched_equals_per_image(gapnet, images, name):
    targets = [0, 3, 1, 4]
    options = {"samples": 4} if name == "smoothgrad" else {}
    batched = make_method(name, gapnet, **options).attribute(images, targets)
    for i in range(len(images)):
        single = make_method(name, gapnet, **options).attribute(images[i:i + 1], targets[i])
        assert torch.allclose(single.maps, batched.maps[i:i + 1], atol=1e-5, rtol=1e-4), name
    assert batched.targets.tolist() == targets


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "layercam", "xgradcam", "scorecam"])
def test_inplace_relu_after_layer_gives_same_maps(images, name):
    plain, inplace = GapNet(inplace=False).eval(), GapNet(inplace=True).eval()
    inplace.load_state_dict(plain.state_dict())
    a = attribute(name, plain, images, target=1, layer="conv2")
    b = attribute(name, inplace, images, target=1, layer="conv2")
    assert torch.allclose(a.raw, b.raw, atol=1e-6)


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_no_hook_left_after_success_or_exception(gapnet, images):
    for name in METHODS:
        make_method(name, gapnet, **({"samples": 2} if name == "smoothgrad" else {})).attribute(images[:1])
        assert count_hooks(gapnet) == 0, name
    broken = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Boom())
    for name in ("gradcam", "saliency", "guided-backprop"):
        with pytest.raises(RuntimeError, match="boom"):
            make_method(name, broken, layer="1").attribute(images[:1], 0)
        assert count_hooks(broken) == 0
    assert all(p.requires_grad for p in broken.parameters())


def test_parameters_flags_restored_and_no_param_grads(gapnet, images):
    gapnet.conv1.weight.requires_grad_(False)
    for name in ("gradcam", "guided-backprop", "integrated-gradients"):
        attribute(name, gapnet, images)
    assert gapnet.conv1.weight.requires_grad is False and gapnet.fc.weight.requires_grad is True
    assert all(p.grad is None for p in gapnet.parameters())


def test_guided_backprop_hand_computed():
    """y = w2 · relu(W1 x): guided gradient = W1ᵀ [(W1x > 0)(w2 > 0) w2]."""
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 0.5], [-1.0, 0.0, 2.0]]))
        net[2].weight.copy_(torch.tensor([[2.0, -3.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0, 1.0]])
    h = net[0].weight @ x[0]  # [1, 1, 1] → all positive
    w2 = net[2].weight[0]
    keep = (h > 0) & (w2 > 0)
    expected_guided = net[0].weight.t() @ (w2 * keep)
    expected_deconv = net[0].weight.t() @ (w2 * (w2 > 0))
    expected_vanilla = net[0].weight.t() @ (w2 * (h > 0))
    wrapped = nn.Sequential(nn.Unflatten(1, (3, 1, 1)), nn.Flatten(), *net)
    xin = x.view(1, 3, 1, 1)
    from convlens.attribution.gradient import Deconvnet, GuidedBackprop, Saliency

    assert torch.allclose(GuidedBackprop(wrapped).attribute(xin, 0).raw.flatten(), expected_guided)
    assert torch.allclose(Deconvnet(wrapped).attribute(xin, 0).raw.flatten(), expected_deconv)
    assert torch.allclose(Saliency(wrapped).attribute(xin, 0).raw.flatten(), expected_vanilla)


def test_guided_rule_caps_relu6_and_covers_functional_relu():
    class Net(nn.Module):
        def forward(self, x):
            return (nn.ReLU6(inplace=True)(x * 1) + F.relu(x) * 0.5).sum(1, keepdim=True).flatten(1)

    x = torch.tensor([[-1.0, 3.0, 8.0]]).view(1, 3, 1, 1)
    from convlens.attribution.gradient import GuidedBackprop

    g = GuidedBackprop(Net()).attribute(x, 0).raw.flatten()
    assert g.tolist() == [0.0, 1.5, 0.5]  # x=8: ReLU6 saturated, only the uncapped F.relu passes


def test_scorecam_weights_are_softmax_of_masked_inputs(gapnet, images):
    x = images[:1]
    method = ScoreCAM(gapnet, layer="act2", batch_size=3)
    res = method.attribute(x, 2)
    acts = {}
    h = gapnet.act2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        gapnet(x)
    h.remove()
    a = acts["a"][0]
    weights = []
    for k in range(a.shape[0]):
        up = F.interpolate(a[k][None, None], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
        if up.max() == up.min():
            weights.append(0.0)
            continue
        mask = (up - up.min()) / (up.max() - up.min())
        with torch.no_grad():
            weights.append(float(F.softmax(gapnet(x * mask), 1)[0, 2]))
    expected = F.relu((torch.tensor(weights)[:, None, None] * a).sum(0))
    assert torch.allclose(res.raw[0], expected, atol=1e-6)


def test_integrated_gradients_completeness(gapnet, images):
    ig = IntegratedGradients(gapnet, steps=256, batch_size=512).attribute(images, 3)
    with torch.no_grad():
        delta = gapnet(images)[:, 3] - gapnet(torch.zeros_like(images))[:, 3]
    total = ig.raw.flatten(1).sum(1)
    assert torch.all((total - delta).abs() <= 0.01 * delta.abs() + 1e-4), (total, delta)


def test_targets_callable_tuple_output_and_errors(gapnet, images):
    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = gapnet

        def forward(self, x):
            return {"aux": torch.zeros(1), "scores": self.inner(x)}

    a = make_method("gradcam", TupleNet(), output_selector="scores").attribute(images, 1)
    b = attribute("gradcam", gapnet, images, target=1)
    assert torch.allclose(a.raw, b.raw)
    c = attribute("gradcam", gapnet, images, target=lambda s: s[:, 1])
    assert torch.allclose(c.raw, b.raw) and c.targets.tolist() == [-1] * 4
    with pytest.raises(ConvlensError, match="out of range"):
        attribute("gradcam", gapnet, images, target=7)
    with pytest.raises(ConvlensError, match="input channel"):
        attribute("gradcam", GapNet().eval(), torch.zeros(1, 1, 12, 12))
    with pytest.raises(ConvlensError, match="available layers: conv1"):
        attribute("gradcam", gapnet, images, layer="conv9")
    with pytest.raises(ConvlensError, match="spatial"):
        attribute("gradcam", gapnet, images, layer="fc")
    with pytest.raises(ConvlensError, match="global-average-pooling"):
        attribute("cam", nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(200, 3)), images)


def test_flat_map_normalizes_to_zeros_with_warning():
    maps = torch.stack([torch.zeros(4, 4), torch.arange(16.0).view(4, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(4, 4)) and float(out[1].max()) == 1.0
    assert any("flat" in str(w.message) for w in caught)
    assert not torch.isnan(out).any()


def test_auto_layer_choice(lab_model):
    x = torch.zeros(2, 1, 28, 28)
    assert attribute("gradcam", lab_model.model, x).layer == "l3"
    assert attribute("kerasvis-guided-gradcam", lab_model.model, x).layer == "l3_mp"


def test_efficientnet_predicts_espresso_and_guided_differs_on_relu6(lite0):
    from convlens.data.images import open_image, package_photos_dir

    x = lite0.preprocess(open_image(package_photos_dir() / "coffee.png"))[None]
    with torch.no_grad():
        probs = lite0.model(x).softmax(1)[0]
    assert lite0.class_names[int(probs.argmax())] == "espresso" and float(probs.max()) > 0.9
    guided = attribute("guided-backprop", lite0.model, x).raw
    vanilla = attribute("saliency", lite0.model, x).raw
    assert not torch.allclose(guided, vanilla)
    cam = attribute("gradcam", lite0.model, x)
    assert cam.layer == "_head_act" and cam.raw.shape == (1, 7, 7) and cam.maps.shape == (1, 224, 224)
