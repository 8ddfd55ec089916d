import json
import math

import pytest
import torch
from torch import nn

from conftest import run_cli
from convlens.attribution import make_method
from convlens.evaluation import auc, average_drop_increase, deletion_insertion, randomized
from convlens.evaluation.sanity import (average_ranks, cascading_randomization, randomization_groups, spearman,
                                        ssim)


def test_auc_of_known_curves():
    assert float(auc(torch.tensor([1.0, 1.0, 1.0]))) == pytest.approx(1.0)
    assert float(auc(torch.linspace(1, 0, 11))) == pytest.approx(0.5)
    assert float(auc(torch.tensor([0.0, 1.0, 0.0]))) == pytest.approx(0.5)


class MeanLogit(nn.Module):
    """Two classes, logits (0, k·mean(x)): the target probability is a smooth function of the fraction kept."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), 6.0 * x.mean((1, 2, 3))], 1)


def test_auc_integrates_over_the_actual_fractions():
    """28×28 with 10 steps: round(t·784/10) pixels are not evenly spaced fractions."""
    x, maps = torch.ones(1, 1, 28, 28), torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    curves = deletion_insertion(MeanLogit(), x, maps, torch.tensor([1]), steps=10, deletion_baseline="zero")
    counts = [round(t * 784 / 10) for t in range(11)]  # Python rounds half to even, as torch.round does
    fractions = [c / 784 for c in counts]
    probs = [1 / (1 + math.exp(-6.0 * (1 - f))) for f in fractions]
    by_hand = sum((fractions[i + 1] - fractions[i]) * (probs[i] + probs[i + 1]) / 2 for i in range(10))
    evenly = sum((probs[i] + probs[i + 1]) / 2 for i in range(10)) / 10
    assert abs(by_hand - evenly) > 1e-5  # the case distinguishes the two
    assert curves.fractions.tolist() == pytest.approx(fractions, abs=1e-7)
    assert float(curves.deletion_auc[0]) == pytest.approx(by_hand, abs=1e-6)
    assert float(auc(torch.tensor(probs), torch.tensor(fractions))) == pytest.approx(by_hand, abs=1e-6)


class OnePixel(nn.Module):
    """Logits depend only on pixel (2, 3): class 1 when it is bright."""

    def forward(self, x):
        v = x[:, 0, 2, 3] * 10
        return torch.stack([-v, v], 1)


def test_pixel_the_output_depends_on_ranks_first():
    model = OnePixel()
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 3] = 1.0
    sal = make_method("saliency", model).attribute(x, 1)
    assert int(sal.maps[0].flatten().argmax()) == 2 * 6 + 3
    curves = deletion_insertion(model, x, sal.maps, torch.tensor([1]), steps=36, insertion_baseline="zero")
    assert curves.deletion[0, 0] > 0.99 and curves.deletion[0, 1] == pytest.approx(0.5)
    assert curves.insertion[0, 0] == pytest.approx(0.5) and curves.insertion[0, 1] > 0.99
    reversed_curves = deletion_insertion(model, x, -sal.maps, torch.tensor([1]), steps=36)
    assert float(reversed_curves.deletion_auc) > float(curves.deletion_auc)


def test_results_do_not_depend_on_batch_size(lab_model, mnist_test):
    x = mnist_test[0][:6]
    t = lab_model.model(x).argmax(1)
    maps = make_method("gradcam", lab_model.model).attribute(x, t).maps
    a = deletion_insertion(lab_model.model, x, maps, t, steps=10, batch_size=7)
    b = deletion_insertion(lab_model.model, x, maps, t, steps=10, batch_size=1000)
    assert torch.allclose(a.deletion, b.deletion, atol=1e-6) and torch.allclose(a.insertion, b.insertion, atol=1e-6)


def test_average_drop_and_increase():
    model = OnePixel()
    x = torch.zeros(2, 1, 6, 6)
    x[:, 0, 2, 3] = 1.0
    keep = torch.zeros(2, 6, 6)
    keep[0, 2, 3] = 1.0  # image 0 keeps the pixel, image 1 loses it
    res = average_drop_increase(model, x, keep, torch.tensor([1, 1]))
    p = torch.sigmoid(torch.tensor(20.0))  # 2-class softmax of (−10, 10)
    assert res["per_image_drop"][0] == pytest.approx(0.0)
    assert res["per_image_drop"][1] == pytest.approx(float((p - 0.5) / p * 100), rel=1e-4)
    assert res["increase_in_confidence"] == 0.0


def test_randomization_restores_weights(lab_model):
    model = lab_model.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = randomization_groups(model)
    assert [g[0] for g in groups] == ["l5", "l4", "l3", "l2", "l1"]
    with randomized(model, groups[:2], seed=1):
        assert not torch.equal(model.l5.weight, before["l5.weight"])
        assert torch.equal(model.l1.conv.weight, before["l1.conv.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError):
        with randomized(model, groups, seed=1):
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_similarity_measures():
    a = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0]).numpy()).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_cascading_accepts_user_defined_methods(lab_model, mnist_test):
    x = mnist_test[0][:3]
    t = lab_model.model(x).argmax(1)
    result = cascading_randomization(lab_model.model, {"input": lambda xs, ts: xs[:, 0],
                                                       "gradcam": make_method("gradcam", lab_model.model)}, x, t)
    assert [s["input"]["spearman"] for s in result["steps"]] == pytest.approx([1.0] * 5)
    assert len(result["steps"]) == 5


def test_evaluate_cli(trained_run, tmp_path):
    proc = run_cli("evaluate", "--model", trained_run, "--out", tmp_path, "--mnist-test", "12",
                   "--methods", "gradcam,saliency,guided-backprop", "--sanity-images", "3", "--quiet",
                   "--no-data-randomization")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(summary["table"]) == {"gradcam", "saliency", "guided-backprop"}
    for row in summary["table"].values():
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    for name in summary["figures"].values():
        assert (tmp_path / name).is_file()
    assert len(summary["sanity"]["cascading"]["steps"]) == 5
