"""Pairs of classes in activation maximization: the margin objective, the per-pair tv-weight choice, actmax.json."""
import json
import math

import pytest
import torch
from torch import nn

from convlens.errors import ConvlensError
from convlens.featvis.objectives import LOGITS, strongest_other_logit
from convlens.featvis.run import choose_pair_weight, pair_objective


def logits(*rows):
    return {LOGITS: torch.tensor(rows, dtype=torch.float32)}


def test_pair_objective_is_the_margin_of_the_smooth_minimum_over_the_strongest_other_logit():
    o = logits([3.0, 1.0, 5.0, 0.0], [2.0, 2.0, -1.0, 1.5])
    # row 0: softmin(3, 1) = −log(e^−3 + e^−1); strongest other logit: 5 (class 2)
    # row 1: softmin(2, 2) = 2 − log 2;         strongest other logit: 1.5 (class 3)
    expected = [-math.log(math.exp(-3) + math.exp(-1)) - 5.0, 2.0 - math.log(2.0) - 1.5]
    assert pair_objective(0, 1, "default")(o).tolist() == pytest.approx(expected, rel=1e-6)
    assert pair_objective(1, 0, "default")(o).tolist() == pytest.approx(expected, rel=1e-6)  # symmetric
    # keras-vis: the plain sum of both logits
    assert pair_objective(0, 1, "kerasvis")(o).tolist() == pytest.approx([4.0, 4.0])


def test_strongest_other_logit_values_and_gradient():
    z = torch.tensor([[3.0, 1.0, 5.0, 0.0], [9.0, 8.0, -1.0, 1.5]], requires_grad=True)
    value = strongest_other_logit([0, 1])({LOGITS: z})
    assert value.tolist() == [5.0, 1.5]
    value.sum().backward()
    # the gradient reaches only the strongest other class of each row
    assert z.grad.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert strongest_other_logit([2])(logits([3.0, 1.0, 5.0, 0.0])).tolist() == [3.0]
    with pytest.raises(ConvlensError):
        strongest_other_logit([])
    with pytest.raises(ConvlensError):
        strongest_other_logit([0, 1])(logits([1.0, 2.0]))


def test_margin_gradient_raises_the_weaker_target_and_lowers_the_third_class():
    z = torch.tensor([[6.0, 1.0, 4.0]], requires_grad=True)
    pair_objective(0, 1, "default")({LOGITS: z}).sum().backward()
    g = z.grad[0]
    w = math.exp(-1) / (math.exp(-6) + math.exp(-1))  # softmin weight of the weaker class 1
    assert g.tolist() == pytest.approx([1 - w, w, -1.0], rel=1e-6)


def test_pair_weight_choice_rule():
    weights = [1.0, 2.0, 4.0, 8.0]
    both = [True, True, True, False]  # the network puts both on top at 1, 2, 4
    # recognized at 2 and 4: the higher judge probability wins
    i, why = choose_pair_weight(weights, both, [False, True, True, True], [0.9, 0.3, 0.4, 0.99])
    assert i == 2 and "recognized at 3 of 4 weights" in why
    # 8 is recognized with the best probability but the network does not put both on top: not eligible
    assert choose_pair_weight(weights, both, [False, False, False, True], [0.1, 0.2, 0.3, 0.9])[0] == 2
    # nothing recognized: the highest judge probability among the eligible weights
    assert choose_pair_weight(weights, both, [False] * 4, [0.1, 0.25, 0.2, 0.9])[0] == 1
    # a full tie: the smaller weight
    assert choose_pair_weight(weights, both, [True, True, False, False], [0.5, 0.5, 0.1, 0.1])[0] == 0
    # eligible nowhere: all weights compete
    i, why = choose_pair_weight(weights, [False] * 4, [False, False, False, True], [0.1, 0.2, 0.3, 0.05])
    assert i == 3 and "at no weight" in why


def test_pair_weight_choice_does_not_move_when_larger_weights_are_added():
    weights, both, rec, prob = [0.5, 1.0, 2.0], [True, True, True], [False, True, True], [0.2, 0.6, 0.5]
    base = choose_pair_weight(weights, both, rec, prob)[0]
    assert weights[base] == 1.0
    for extra in ([(True, False, 0.99)], [(False, True, 0.99)], [(True, True, 0.6), (True, True, 0.3)],
                  [(True, False, 0.1), (False, False, 0.0)]):
        more = weights + [2.0 ** (2 + k) for k in range(len(extra))]
        i = choose_pair_weight(more, both + [e[0] for e in extra], rec + [e[1] for e in extra],
                               prob + [e[2] for e in extra])[0]
        assert more[i] == 1.0, extra
    # a larger weight that is better (eligible, recognized, higher probability) is chosen, as it should be
    assert choose_pair_weight(weights + [8.0], both + [True], rec + [True], prob + [0.7])[0] == 3


class FakeJudge(nn.Module):
    """Two fixed random linear classifiers of the image, (2, B, 10) logits: stands in for the trained judge."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(2, 784, 10, generator=gen)

    def forward(self, x):
        return torch.einsum("bp,jpk->jbk", x.flatten(1), self.w)


@pytest.fixture
def untrained_lab(monkeypatch):
    """An untrained (seeded) lab network with the MNIST profile, and the fake judge in place of the cached one."""
    from convlens.featvis import run
    from convlens.models import LabNet, LoadedModel
    from convlens.models.registry import lab_profile

    monkeypatch.setattr(run, "load_judge", lambda: (FakeJudge(), {"test_accuracy": {"cnn": 0.0, "mlp": 0.0}}))
    monkeypatch.setattr(run, "PAIR_START_POOL", 1000)  # the pairs' start from 1000 training images: fast
    torch.manual_seed(0)
    return LoadedModel(LabNet().eval(), lab_profile("untrained"))


def test_actmax_json_records_each_pairs_weight_choice(untrained_lab, tmp_path):
    from convlens.featvis.run import actmax

    s = actmax(untrained_lab, tmp_path, classes=[0, 1], tv_weights=[1.0, 4.0], pairs=[(1, 7), (4, 9)], steps=4,
               progress=False)
    saved = json.loads((tmp_path / "actmax.json").read_text())
    assert saved["pairs"] == json.loads(json.dumps(s["pairs"]))
    assert saved["pair_tv_weights"] == [1.0, 4.0] and saved["pair_steps"] == 8 and saved["pair_restarts"] == 1
    assert all(p["start_judge_recognized"] in (True, False) for p in saved["pairs"])
    judge = saved["judge"]
    for i, w in enumerate(saved["pair_tv_weights"]):
        assert judge["pair_counts"][i] == sum(p["sweep"][i]["judge_recognized"] for p in saved["pairs"])
    assert judge["pairs_recognized"] == sum(p["judge_recognized"] for p in saved["pairs"])
    for pair in saved["pairs"]:
        sweep = pair["sweep"]
        assert [e["tv_weight"] for e in sweep] == [1.0, 4.0]
        i, why = choose_pair_weight([1.0, 4.0], [e["both_top2"] for e in sweep],
                                    [e["judge_recognized"] for e in sweep], [e["judge_probability"] for e in sweep])
        assert pair["tv_weight"] == sweep[i]["tv_weight"] and pair["tv_choice"] == why
        assert pair["target_probabilities"] == sweep[i]["target_probabilities"]
        assert pair["judge_top_by"] == sweep[i]["judge_top_by"] and set(pair["judge_top_by"]) == {"cnn", "mlp"}
        assert pair["judge_recognized"] == all(sorted(t) == sorted(map(str, pair["targets"]))
                                               for t in pair["judge_top_by"].values())
        assert pair["both_top2"] == (sorted(pair["top2"]) == sorted(map(str, pair["targets"])))
        assert (tmp_path / pair["image"]).is_file()
    assert (tmp_path / saved["figures"]["pair_sweep"]).is_file()


def test_pair_images_at_shared_weights_do_not_change_when_weights_are_added(untrained_lab):
    from convlens.featvis import run

    cfg = run.base_config(untrained_lab, 4, "default", 0, "pixel", "default", False)
    judge = run.load_judge()[0]
    small = run.run_pairs(untrained_lab, [(0, 1)], "default", [1.0, 4.0], cfg, 1, judge)
    large = run.run_pairs(untrained_lab, [(0, 1)], "default", [1.0, 4.0, 64.0], cfg, 1, judge)
    assert torch.allclose(small.sweep.images, large.sweep.images[:2], atol=1e-5)
    a, b = small.records[0], large.records[0]
    for x, y in zip(a["sweep"], b["sweep"][:2]):
        assert x["judge_recognized"] == y["judge_recognized"]
        assert x["judge_probability"] == pytest.approx(y["judge_probability"], abs=1e-5)
    if b["tv_weight"] != a["tv_weight"]:  # only a better image at the added weight may take over
        assert b["tv_weight"] == 64.0
        e = b["sweep"][2]
        old = next(x for x in a["sweep"] if x["tv_weight"] == a["tv_weight"])
        assert (e["both_top2"] or not old["both_top2"]) and (e["judge_recognized"], e["judge_probability"]) > (
            old["judge_recognized"], old["judge_probability"])


def test_without_a_judge_pairs_use_the_class_images_weight(tmp_path):
    from convlens.featvis.run import actmax
    from convlens.models import LabNet, LoadedModel
    from convlens.models.registry import lab_profile
    from dataclasses import replace

    torch.manual_seed(0)
    loaded = LoadedModel(LabNet().eval(), replace(lab_profile("untrained"), dataset=None))
    s = actmax(loaded, tmp_path, classes=[3], tv_weights=[1.0, 4.0], pairs=[(0, 1)], steps=4, progress=False)
    assert "judge" not in s and s["pair_tv_weights"] == [s["chosen_tv_weight"]]
    assert s["pairs"][0]["tv_weight"] == s["chosen_tv_weight"] and len(s["pairs"][0]["sweep"]) == 1
    assert "pair_sweep" not in s["figures"]


def test_restarts_keep_the_start_the_network_scores_highest():
    from convlens.featvis import ActMaxConfig, maximize
    from convlens.featvis.run import maximize_with_restarts
    from convlens.models import LabNet

    torch.manual_seed(0)
    model = LabNet().eval()
    objs = [pair_objective(1, 7, "default"), pair_objective(4, 9, "default")]
    starts = torch.stack([torch.full((1, 28, 28), 0.1), torch.full((1, 28, 28), 0.3)])  # one start per objective
    cfg = ActMaxConfig(steps=6, tv_weight=[1.0, 2.0], seed=3, init=starts)
    best = maximize_with_restarts(model, objs, (1, 28, 28), cfg, restarts=3)
    for i, obj in enumerate(objs):
        alone = [maximize(model, [obj], (1, 28, 28),
                          ActMaxConfig(steps=6, tv_weight=cfg.tv_weight[i], seed=3000 + r, init=starts[i]))
                 for r in range(3)]
        values = [float(a.objective[0]) for a in alone]
        r = max(range(3), key=values.__getitem__)
        assert float(best.objective[i]) == pytest.approx(values[r], abs=1e-4)
        assert torch.allclose(best.images[i], alone[r].images[0], atol=1e-5)


class NearestToTarget(nn.Module):
    """Logits: z_a = z_b = −‖x − t‖², every other class 0 — the pair margin ranks images by closeness to t."""

    def __init__(self, t, a, b):
        super().__init__()
        self.t, self.a, self.b = t, a, b
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        d = -(x - self.t).pow(2).flatten(1).sum(1)
        z = torch.zeros(len(x), 10)
        z[:, self.a] = d
        z[:, self.b] = d
        return z


def test_pair_start_is_the_mean_of_the_networks_most_pair_like_training_images():
    from convlens.data.mnist import load_mnist
    from convlens.featvis.run import pair_start_images
    from convlens.models import LoadedModel
    from convlens.models.registry import lab_profile

    x, _ = load_mnist("train").tensors()
    pool = x[:500]
    t = pool[17]
    loaded = LoadedModel(NearestToTarget(t, 1, 7), lab_profile("stub"))
    start = pair_start_images(loaded, [pair_objective(1, 7, "default")], k=3, pool=500)
    nearest = (pool - t).pow(2).flatten(1).sum(1).topk(3, largest=False).indices
    assert 17 in nearest.tolist()
    assert start.shape == (1, 1, 28, 28)
    assert torch.allclose(start[0], pool[nearest].mean(0), atol=1e-6)
    assert torch.allclose(pair_start_images(loaded, [pair_objective(7, 1, "default")], k=1, pool=500)[0], t)
