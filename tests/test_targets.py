"""One target representation: every method × every way of writing a target (issue 10 item 3 / seam)."""
import numpy as np
import pytest
import torch

from convlens.attribution import METHODS, Target, make_method
from convlens.errors import ConvlensError
from nets import GapNet as SmallNet


OPTIONS = {"smoothgrad": {"samples": 3}, "integrated-gradients": {"steps": 4}}
CLASS_ONLY = {"cam", "scorecam"}


@pytest.fixture(scope="module")
def net():
    return SmallNet().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(3))


def run(name, net, x, target):
    return make_method(name, net, **OPTIONS.get(name, {})).attribute(x, target)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_target_form_gives_the_same_maps(name, net, x):
    per_sample = [0, 3, 1, 4]
    ref = run(name, net, x, torch.tensor(per_sample))
    assert ref.targets.tolist() == per_sample
    for form in (per_sample, tuple(per_sample), np.array(per_sample), torch.tensor(per_sample, dtype=torch.int32)):
        res = run(name, net, x, form)
        assert torch.allclose(res.maps, ref.maps, atol=1e-6), (name, type(form))
        assert res.targets.tolist() == per_sample
    one = run(name, net, x, 2)
    assert torch.allclose(one.maps, run(name, net, x, [2, 2, 2, 2]).maps, atol=1e-6)
    assert torch.allclose(one.maps, run(name, net, x, torch.tensor([2])).maps, atol=1e-6)
    with torch.no_grad():
        predicted = net(x).argmax(1).tolist()
    default = run(name, net, x, None)
    assert default.targets.tolist() == predicted
    assert torch.allclose(default.maps, run(name, net, x, predicted).maps, atol=1e-6)
    if name in CLASS_ONLY:
        with pytest.raises(ConvlensError, match="needs class targets"):
            run(name, net, x, lambda s: s[:, 2])
    else:
        fn = run(name, net, x, lambda s: s[:, 2])
        assert fn.targets.tolist() == [-1] * 4
        assert torch.allclose(fn.maps, one.maps, atol=1e-6), name


@pytest.mark.parametrize("bad, fragment", [(2.0, "float"), (2.7, "float"), ("2", "str"), (True, "bool"),
                                           ([1.5, 2.0, 0.0, 1.0], "integers"), (torch.tensor([2.9]), "integers"),
                                           (["a", "b"], "class indices")])
@pytest.mark.parametrize("name", ["gradcam", "saliency", "smoothgrad", "integrated-gradients", "guided-gradcam"])
def test_non_integer_targets_are_refused(name, net, x, bad, fragment):
    with pytest.raises(ConvlensError, match=fragment):
        run(name, net, x, bad)


def test_target_resolves_once_and_repeats():
    scores = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    t = Target.resolve(None, scores)
    assert t.classes.tolist() == [1, 0] and Target.resolve(t, scores) is t
    assert t.repeat(3).classes.tolist() == [1, 0] * 3 and t.repeat(3).size == 6
    assert t.explained(scores).tolist() == [2.0, 3.0]
    f = Target.resolve(lambda s: s[:, 2] - s[:, 0], scores)
    assert f.explained(scores).tolist() == [1.0, -2.0] and f.labels().tolist() == [-1, -1]
    with pytest.raises(ConvlensError, match="2 inputs"):
        Target.resolve(t, scores[:1])
    with pytest.raises(ConvlensError, match="3 targets for 2"):
        Target.resolve([0, 1, 2], scores)
    with pytest.raises(ConvlensError, match="out of range"):
        Target.resolve(-1, scores)
    with pytest.raises(ConvlensError, match="one score per input"):
        Target.resolve(lambda s: s, scores).explained(scores)
