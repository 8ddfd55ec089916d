"""Targets beyond one class (issue 14): class-and-region targets on segmentation outputs (Seg-Grad-CAM) and
token-grid reshaping of transformer-style layers for the CAM family, each checked against the formula."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn


from convlens.attribution import METHODS, make_method, method_info, region_target, tokens_to_grid
from convlens.attribution.cam import CamMethod
from convlens.errors import ConvlensError

CLASS_ONLY = {"cam", "scorecam"}
# SS-CAM, IS-CAM and RISE score softmax(output, dim=1): on a segmentation output the per-pixel class softmax,
# which a Σ-mask head's softmax is not, so they are left out of the masked-sum-head comparison.
PER_PIXEL_SOFTMAX = {"sscam", "iscam", "rise"}
OPTIONS = {"smoothgrad": {"samples": 2}, "integrated-gradients": {"steps": 4}, "smoothgrad-sq": {"samples": 2},
           "vargrad": {"samples": 2}, "smoothgradcam++": {"samples": 2}, "sscam": {"samples": 2},
           "iscam": {"samples": 2}, "rise": {"masks": 16}, "lime": {"samples": 16, "segments": 4},
           "kernel-shap": {"samples": 16}, "shapley-sampling": {"permutations": 1},
           "feature-ablation": {"cells": 2}, "gradient-shap": {"samples": 2}}


class SegNet(nn.Module):
    """Fully convolutional: conv → ReLU → conv → ReLU → 1×1 conv to 4 class logits per pixel, (N, 4, H, W)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))))


class MaskedSum(nn.Module):
    """The same network with the region sum as its head: scores[n, c] = Σ_hw mask · seg(x)[n, c]."""

    def __init__(self, seg, mask):
        super().__init__()
        self.seg, self.mask = seg, mask

    def forward(self, x):
        return (self.seg(x) * self.mask).sum((2, 3))


@pytest.fixture(scope="module")
def seg():
    return SegNet().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def region(seed=2, shape=(8, 8)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def layer_and_grad(model, layer, x, score):
    """The layer's output A and ∂(Σ_n score_n)/∂A, by hand."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    with torch.enable_grad():
        out = model(x)
        grad = torch.autograd.grad(score(out).sum(), kept["a"])[0]
    handle.remove()
    return kept["a"].detach(), grad


def gradcam_formula(acts, grads):
    """Selvaraju et al.: α_k = mean_ij ∂y/∂A_k; ReLU(Σ_k α_k A_k)."""
    return F.relu((grads.mean((2, 3))[:, :, None, None] * acts).sum(1))


def test_gradcam_on_a_region_is_the_seg_gradcam_formula(seg, x):
    classes, masks = [2, 0, 3], torch.stack([region(s) for s in (2, 3, 4)])
    res = make_method("gradcam", seg, layer="act2").attribute(x, region_target(classes, masks))
    score = lambda out: (masks * out[torch.arange(3), classes]).sum((1, 2))  # noqa: E731
    acts, grads = layer_and_grad(seg, seg.act2, x, score)
    expected = gradcam_formula(acts, grads)
    assert expected.abs().max() > 0
    assert torch.allclose(res.raw, expected, atol=1e-6)
    assert res.targets.tolist() == [-1, -1, -1]
    with torch.no_grad():
        assert torch.allclose(res.target.explained(seg(x)), score(seg(x)), atol=1e-5)



@pytest.mark.parametrize("name", ["ablationcam", "smoothgradcam++", "occlusion"])
def test_per_sample_regions_stay_aligned_through_select_and_repeat(name, seg, x):
    """Methods that score subsets (select) or stacked copies (repeat) of the batch: per-sample regions give
    the same maps as one image at a time."""
    classes, masks = [1, 3, 0], torch.stack([region(s) for s in (10, 11, 12)])
    method = make_method(name, seg, **({"layer": "act2"} if method_info(name).needs_layer else {}),
                         **OPTIONS.get(name, {}))
    batch = method.attribute(x, region_target(classes, masks)).maps
    alone = torch.cat([method.attribute(x[i:i + 1], region_target(classes[i], masks[i])).maps for i in range(3)])
    assert alone.abs().max() > 0
    assert torch.allclose(batch, alone, atol=1e-5), name


def test_saliency_on_a_region_is_the_gradient_of_the_masked_sum(seg, x):
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(5))  # float weights work too
    res = make_method("saliency", seg).attribute(x, region_target(1, mask))
    xi = x.clone().requires_grad_(True)
    expected = torch.autograd.grad((mask * seg(xi)[:, 1]).sum(), xi)[0]
    assert torch.allclose(res.raw, expected, atol=1e-6)
    # per-sample regions through a wrapper that repeats the target (SmoothGrad with zero noise = saliency)
    masks = torch.stack([region(s) for s in (6, 7, 8)])
    one_by_one = torch.cat([make_method("saliency", seg).attribute(x[i:i + 1], region_target([i], masks[i])).raw
                            for i in range(3)])
    smooth = make_method("smoothgrad", seg, samples=3, sigma=0.0).attribute(x, region_target([0, 1, 2], masks))
    assert torch.allclose(smooth.raw, one_by_one, atol=1e-6)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if n not in CLASS_ONLY | PER_PIXEL_SOFTMAX))
def test_every_method_explains_a_region_as_the_masked_sum_head(name, seg, x):
    """region_target(c, M) on the segmentation output = class c of the same network with a Σ M· head."""
    mask = region(9)
    layer = method_info(name).needs_layer
    res = make_method(name, seg, layer="act2" if layer else None,
                      **OPTIONS.get(name, {})).attribute(x, region_target(2, mask))
    ref = make_method(name, MaskedSum(seg, mask).eval(), layer="seg.act2" if layer else None,
                      **OPTIONS.get(name, {})).attribute(x, 2)
    assert torch.allclose(res.maps, ref.maps, atol=1e-5), name
    assert res.targets.tolist() == [-1] * 3


@pytest.mark.parametrize("target", [1, None, [0, 1, 2]])
def test_a_class_target_on_a_segmentation_output_asks_for_region_target(seg, x, target):
    with pytest.raises(ConvlensError, match="region_target"):
        make_method("gradcam", seg, layer="act2").attribute(x, target)


@pytest.mark.parametrize("mask", [torch.ones(7, 8), torch.ones(2, 8, 8), torch.ones(3, 1, 8, 8), torch.ones(8)])
def test_a_mask_of_the_wrong_shape_is_refused(seg, x, mask):
    with pytest.raises(ConvlensError, match="mask"):
        make_method("saliency", seg).attribute(x, region_target(0, mask))


def test_region_target_checks_classes_and_dtype(seg, x):
    with pytest.raises(ConvlensError, match="out of range"):
        make_method("saliency", seg).attribute(x, region_target(4, torch.ones(8, 8)))
    with pytest.raises(ConvlensError, match="bool or float"):
        region_target(0, torch.ones(8, 8, dtype=torch.long))
    with pytest.raises(ConvlensError, match=r"\(N, C, H, W\)"):
        region_target(0, torch.ones(8, 8))(torch.zeros(3, 4))


class TinyViT(nn.Module):
    """Patch embedding (4×4 conv) → tokens (+ a class token first) → MLP token mixer (across tokens and
    channels) → mean over tokens → linear head; ``mix=False``: the tokens are the ReLU'd patch grid."""

    def __init__(self, class_token=True, mix=True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.act = nn.ReLU()
        self.mix = mix
        self.cls = nn.Parameter(torch.randn(1, 1, 8)) if class_token else None
        tokens = 16 + int(class_token)
        self.mix_tokens = nn.Linear(tokens, tokens)
        self.mix_channels = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.mixer = nn.Identity()  # the layer explained: (N, tokens, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = self.act(self.embed(x)).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        if self.mix:
            t = t + self.mix_tokens(t.transpose(1, 2)).transpose(1, 2)
            t = t + self.mix_channels(t)
        t = self.mixer(t)
        return self.fc(t.mean(1))


def grid_by_hand(tokens, drop, h, w):
    """(N, T, C) → (N, C, h, w), cell (i, j) ← token drop + i·w + j, written out cell by cell."""
    return torch.stack([torch.stack([tokens[:, drop + i * w + j] for j in range(w)], -1) for i in range(h)], -2)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("options, drop, grid", [({"reshape": "tokens", "drop_tokens": 1}, 1, (4, 4)),
                                                 ({"reshape": "tokens", "drop_tokens": 1, "grid": (2, 8)}, 1, (2, 8)),
                                                 ({"reshape": lambda t: tokens_to_grid(t, 1)}, 1, (4, 4))])
def test_gradcam_on_a_token_layer_is_the_formula_on_the_token_grid(images, options, drop, grid):
    vit = TinyViT().eval()
    res = make_method("gradcam", vit, layer="mixer", **options).attribute(images, [3, 1])
    tokens, token_grads = layer_and_grad(vit, vit.mixer, images, lambda s: s[torch.arange(2), [3, 1]])
    acts, grads = grid_by_hand(tokens, drop, *grid), grid_by_hand(token_grads, drop, *grid)
    expected = gradcam_formula(acts, grads)
    assert expected.abs().max() > 0
    assert torch.allclose(res.raw, expected, atol=1e-6)
    assert res.maps.shape == (2, 16, 16)


def test_the_token_grid_of_a_patch_embedding_is_the_patch_grid(images):
    vit = TinyViT(class_token=False)
    patches = vit.act(vit.embed(images))
    assert torch.equal(tokens_to_grid(patches.flatten(2).transpose(1, 2)), patches)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if n != "ablationcam" and (
        issubclass(cls, CamMethod) or n in ("guided-gradcam", "fusedcam"))))
def test_every_cam_method_reads_the_token_grid(name, images):
    """Without a class token or mixing, the tokens are the patch grid flattened: every CAM method on the
    token layer (reshaped) = the same method on the 4-D patch-embedding layer."""
    vit = TinyViT(class_token=False, mix=False).eval()
    on_tokens = make_method(name, vit, layer="mixer", reshape="tokens", **OPTIONS.get(name, {}))
    on_patches = make_method(name, vit, layer="act", **OPTIONS.get(name, {}))
    res, ref = on_tokens.attribute(images, 3), on_patches.attribute(images, 3)  # logit 3 > 0 (keras-vis)
    assert ref.raw.abs().max() > 0
    assert torch.allclose(res.raw, ref.raw, atol=1e-6), name


def test_token_reshape_errors(images):
    vit = TinyViT().eval()
    with pytest.raises(ConvlensError, match="square"):  # 17 tokens: the class token not dropped
        make_method("gradcam", vit, layer="mixer", reshape="tokens").attribute(images, 0)
    with pytest.raises(ConvlensError, match="does not hold"):
        make_method("gradcam", vit, layer="mixer", reshape="tokens", drop_tokens=1, grid=(3, 5)).attribute(images, 0)
    with pytest.raises(ConvlensError, match=r"\(h, w\)"):
        make_method("gradcam", vit, layer="mixer", reshape="tokens", drop_tokens=1, grid=(16,)).attribute(images, 0)
    with pytest.raises(ConvlensError, match="token layer with layer="):  # a 4-D layer given with reshape
        make_method("gradcam", vit, layer="embed", reshape="tokens").attribute(images, 0)
    with pytest.raises(ConvlensError, match="reshape='tokens'"):  # a token layer without reshape
        make_method("gradcam", vit, layer="mixer").attribute(images, 0)
    with pytest.raises(ConvlensError, match="only with reshape='tokens'"):
        make_method("gradcam", vit, layer="mixer", drop_tokens=1)
    with pytest.raises(ConvlensError, match="reshape must be"):
        make_method("gradcam", vit, layer="mixer", reshape="grid")
    with pytest.raises(ConvlensError, match="no reshape"):
        make_method("ablationcam", vit, layer="mixer", reshape="tokens", drop_tokens=1)
