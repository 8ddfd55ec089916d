import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_clean_error, run_cli
from convlens import stats
from convlens.errors import ConvlensError


class Identity2(nn.Module):
    """'conv' = the input itself (2 channels), then a head so the model returns logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.conv(x))


def test_statistics_of_known_activations():
    x = torch.tensor([
        [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]],   # class 0
        [[[3.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]],   # class 0
        [[[0.0, 0.0], [0.0, 0.0]], [[4.0, 4.0], [4.0, 4.0]]],   # class 1
    ])
    y = torch.tensor([0, 0, 1])
    s = stats.collect(Identity2(), [(x, y)], ["conv"], classes=2).layer("conv")
    assert np.allclose(s["mean_map"][0, 0], [[2.0, 0.0], [0.0, 0.5]])
    assert np.allclose(s["score"], [[(0.25 + 1.0) / 2, 0.25], [0.0, 4.0]])
    assert np.allclose(s["std"][0], [0.375, 0.25])
    assert np.allclose(s["max"], [[3.0, 2.0], [0.0, 4.0]])
    # winners, class 0: sample 1 → f0 at (0,0), f1 at (0,1); sample 2 → f0 at (0,0) and (1,1)
    assert s["win_rate"][0].tolist() == [0.75, 0.25] and s["win_rate"][1].tolist() == [0.0, 1.0]
    assert np.allclose(s["contrast"], [[0.625, 0.25 - 4.0], [-0.625, 3.75]])
    assert s["rank"].tolist() == [[1, 2], [2, 1]]
    assert s["count"].tolist() == [2, 1]


def test_ranks_are_stable_under_ties():
    assert stats.ranks(np.array([[1.0, 3.0, 1.0, 3.0]])).tolist() == [[3, 1, 4, 2]]


def test_merge_of_shards_equals_one_pass(lab_model, mnist_test):
    x, y = mnist_test[0][:600], mnist_test[1][:600]
    layers = ["l1", "l2", "l3"]
    whole = stats.collect(lab_model.model, stats.tensor_batches(x, y, 200), layers, 10)
    a = stats.collect(lab_model.model, stats.tensor_batches(x[:250], y[:250], 100), layers, 10)
    b = stats.collect(lab_model.model, stats.tensor_batches(x[250:], y[250:], 70), layers, 10)
    merged = a.merge(b)
    for layer in layers:
        w, m = whole.layer(layer), merged.layer(layer)
        for key in w:
            assert np.allclose(w[key], m[key], rtol=1e-6, atol=1e-7), (layer, key)  # float32 batch sums


def test_correct_only_drops_misclassified(lab_model, mnist_test):
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    with torch.no_grad():
        correct = int((lab_model.model(x).argmax(1) == y).sum())
    s = stats.collect(lab_model.model, [(x, y)], ["l1"], 10, correct_only=True)
    assert int(s.counts.sum()) == correct


def test_errors_for_unknown_and_non_spatial_layers(lab_model, mnist_test):
    batch = [(mnist_test[0][:4], mnist_test[1][:4])]
    with pytest.raises(ConvlensError, match="available layers"):
        stats.collect(lab_model.model, batch, ["l9"], 10)
    with pytest.raises(ConvlensError, match="spatial"):
        stats.collect(lab_model.model, batch, ["l4"], 10)


def test_stats_cli_figures_agree_with_json(trained_run, tmp_path):
    out = tmp_path / "stats"
    proc = run_cli("stats", "--model", trained_run, "--out", out, "--limit", "1000", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "stats.json").read_text())
    arrays = np.load(out / "stats.npz")
    for layer in ("l1", "l2", "l3"):
        for c, cls in enumerate(summary["classes"]):
            entry = summary["layers"][layer]["per_class"][cls]
            assert entry["top_filters"][0] == int(np.argmin(arrays[f"{layer}/rank"][c]))
            assert np.allclose(entry["score"], arrays[f"{layer}/score"][c])
    for name in summary["figures"].values():
        assert (out / name).stat().st_size > 1000
    assert sum(summary["counts"]) == 1000
    assert_clean_error(run_cli("stats", "--model", trained_run, "--out", out, "--layers", "nope"), "available layers")


def test_featuremaps_cli(trained_run, tmp_path):
    proc = run_cli("featuremaps", "--model", trained_run, "--out", tmp_path, "--digit", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "featuremaps.json").read_text())
    assert "digit 3" in result["input"]
    for layer in ("l1", "l2", "l3"):
        assert (tmp_path / result["files"]["single"][layer]).is_file()
        assert (tmp_path / result["files"]["all_digits"][layer]).is_file()
    assert_clean_error(run_cli("featuremaps", "--model", trained_run, "--out", tmp_path, "--digit", "12"), "digit")
