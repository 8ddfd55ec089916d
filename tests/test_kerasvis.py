"""keras-vis Grad-CAM variant: PIL bicubic upsampling and the zero map for a non-positive logit (item 8)."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convlens.attribution import attribute
from convlens.attribution.base import upsample


def pil_cubic(x: float, a: float = -0.5) -> float:
    """PIL's bicubic kernel (a = −0.5)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def pil_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PIL's separable resampling for upsampling: output pixel centre
    (o + ½)·n_in/n_out, taps within ±2 input pixels, window clipped to the image and renormalized."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - 2 + 0.5), 0), min(int(centre + 2 + 0.5), n_in)
        w = np.array([pil_cubic(i - centre + 0.5) for i in range(lo, hi)])
        m[o, lo:hi] = w / w.sum()
    return m


def test_pil_bicubic_upsampling_matches_the_formula():
    maps = torch.rand(2, 7, 5, generator=torch.Generator().manual_seed(0))
    ours = upsample(maps, (28, 23), "pil-bicubic")
    rows, cols = pil_resize_matrix(7, 28), pil_resize_matrix(5, 23)
    expected = np.stack([rows @ m.double().numpy() @ cols.T for m in maps])
    assert np.allclose(ours.numpy(), expected, atol=2e-6)
    torch_bicubic = F.interpolate(maps[:, None], size=(28, 23), mode="bicubic", align_corners=False)[:, 0]
    assert float((torch_bicubic - ours).abs().max()) > 1e-2  # the two really differ


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 7 * 7, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_map_is_zero_when_the_target_logit_is_not_positive():
    net = Net().eval()
    x = torch.rand(6, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(x)
    for c in range(3):
        res = attribute("kerasvis-guided-gradcam", net, x, target=c)
        assert res.layer == "pool" and res.maps.shape == (6, 14, 14)
        for i in range(6):
            if logits[i, c] <= 0:
                assert torch.equal(res.maps[i], torch.zeros(14, 14))
            else:
                assert float(res.raw[i].sum()) >= 0
    assert bool((logits <= 0).any()) and bool((logits > 0).any())  # both cases occurred


def test_kerasvis_formula_by_hand():
    """g = guided ∂y/∂A (zero when y ≤ 0) / (max g + 1e-7); w = mean g; ReLU(Σ w A); PIL bicubic."""
    net = Net().eval()
    x = torch.rand(1, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c = int(net(x).argmax())
    acts = net.pool(net.relu(net.conv(x))).detach().requires_grad_(True)
    y = net.fc(acts.flatten(1))[0, c]
    g = torch.autograd.grad(y, acts)[0] * float(y > 0)  # no ReLU between the layer and the logit
    g = g / (g.max() + 1e-7)
    heat = F.relu((g.mean((2, 3))[:, :, None, None] * acts.detach()).sum(1))
    expected = pil_resize_matrix(7, 14) @ heat[0].double().numpy() @ pil_resize_matrix(7, 14).T
    res = attribute("kerasvis-guided-gradcam", net, x, target=c)
    assert torch.allclose(res.raw, heat, atol=1e-6)
    assert np.allclose(res.maps[0].numpy(), expected, atol=1e-5)
    assert math.isclose(float(res.normalized.max()), 1.0)
