"""Performance helpers keep values: channels-last inputs and weights."""
import torch
from torch import nn

from convlens.attribution import attribute
from convlens.hooks import capture
from convlens.runtime import channels_last, channels_last_weights


def test_channels_last_gives_one_channel_batches_channels_last_strides():
    x = torch.rand(5, 1, 6, 7)
    assert x.is_contiguous(memory_format=torch.channels_last)  # why x.contiguous(channels_last) keeps NCHW strides
    y = channels_last(x)
    assert torch.equal(y, x) and y.stride() == (42, 1, 7, 1)
    assert channels_last(y) is y
    rgb = torch.rand(2, 3, 4, 4)
    z = channels_last(rgb)
    assert torch.equal(z, rgb) and z.stride() == (48, 1, 12, 3)
    flat = torch.rand(3, 4)
    assert channels_last(flat) is flat


class OneChannelNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.pool(self.act(self.conv1(x)))).flatten(1))


def test_one_channel_network_runs_channels_last_with_the_same_gradient():
    net = OneChannelNet().eval()
    x = torch.rand(4, 1, 8, 8)
    with capture(net, ["conv1"]) as kept:
        res = attribute("saliency", net, x, target=1)
    assert kept["conv1"].stride()[1] == 1  # the first convolution's output is channels-last
    xi = x.clone().requires_grad_(True)
    want = torch.autograd.grad(net(xi)[:, 1].sum(), xi)[0]
    assert torch.allclose(res.raw, want, atol=1e-6) and float(want.abs().sum()) > 0
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
    with channels_last_weights(net):
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in net.modules()
                   if isinstance(m, nn.Conv2d))
    assert all(m.weight is w for m, w in zip([m for m in net.modules() if isinstance(m, nn.Conv2d)], weights))


def test_auto_layer_found_once_per_model_and_shape_and_again_after_a_module_is_replaced():
    net = OneChannelNet().eval()
    x = torch.rand(2, 1, 8, 8)
    runs = []
    handle = net.register_forward_hook(lambda m, i, o: runs.append(len(i[0])))
    try:
        first = attribute("gradcam", net, x, target=0)
        second = attribute("gradcam", net, x, target=0)  # a new method: the layer is remembered for the model
        assert runs == [1, 2, 2] and first.layer == second.layer == "conv2"
        assert torch.equal(first.maps, second.maps)
        attribute("gradcam", net, torch.rand(2, 1, 9, 9), target=0)  # another input shape: found again
        assert runs[3:] == [1, 2]
        net.conv2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        del runs[:]
        assert attribute("gradcam", net, x, target=0).layer == "conv2" and runs == [1, 2]  # probed again
    finally:
        handle.remove()
