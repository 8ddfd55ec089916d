"""Bad input to every registered method: one ConvlensError, before the expensive part runs."""
import pytest
import torch

from convlens.attribution import METHODS, make_method
from convlens.errors import ConvlensError
from nets import GapNet as Net


@pytest.mark.parametrize("name", sorted(METHODS))
def test_score_function_of_the_wrong_shape(name):
    net = Net().eval()
    x = torch.rand(2, 3, 8, 8)
    calls = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        with pytest.raises(ConvlensError, match="one score per input|needs class targets"):
            make_method(name, net).attribute(x, lambda s: s[:, :2])
    finally:
        handle.remove()
    assert len(calls) <= 3, (name, calls)  # the clean pass (and a layer probe), no sampled copies


@pytest.mark.parametrize("name, options", [
    ("sscam", {"samples": 0}), ("iscam", {"samples": 0}), ("smoothgradcam++", {"samples": 0}),
    ("gradient-shap", {"samples": 0}), ("smoothgrad-sq", {"samples": 0}), ("vargrad", {"samples": 0}),
    ("ablationcam", {"max_channels": 0}), ("ablationcam", {"batch_size": 0}), ("occlusion", {"batch_size": 0}),
    ("lime", {"kernel_width": 0.0}), ("lrp", {"epsilon": -1.0}),
])
def test_zero_samples_and_bad_options(name, options):
    with pytest.raises(ConvlensError):
        make_method(name, Net(), **options)


def test_feature_labels_of_the_wrong_shape():
    with pytest.raises(ConvlensError, match="feature labels"):
        make_method("feature-ablation", Net(), features=torch.zeros(5, 5, dtype=torch.long)).attribute(
            torch.rand(2, 3, 8, 8))
