import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_clean_error, run_cli
from convlens.models import LabNet, summary_rows
from convlens.models.registry import load_checkpoint
from convlens.training import onecycle_lr, random_affine


def test_lab_network_matches_the_report():
    model = LabNet()
    assert sum(p.numel() for p in model.parameters()) == 7465
    rows = {r["layer"]: (r["output_shape"], r["params"]) for r in summary_rows(model)}
    assert rows["l1"] == ("(None, 28, 28, 9)", 234)
    assert rows["l2_mp"] == ("(None, 7, 7, 9)", 0)
    assert rows["l3"] == ("(None, 7, 7, 16)", 1312)
    assert rows["l3_mp"] == ("(None, 3, 3, 16)", 0)
    assert rows["l4"] == ("(None, 25)", 3625) and rows["l5"] == ("(None, 10)", 260)


def test_onecycle_schedule_shape():
    lrs = [onecycle_lr(s, 100, 1e-2) for s in range(100)]
    assert abs(lrs[0] - 1e-2 / 25) < 1e-9 and abs(max(lrs) - 1e-2) < 1e-4
    assert lrs.index(max(lrs)) == 25 and lrs[-1] < 1e-4


def test_random_affine_is_identity_at_zero_strength():
    x = torch.rand(4, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(random_affine(x, gen, 0.0, 0.0, 0.0), x, atol=1e-5)


def test_training_run_writes_everything(trained_run):
    for name in ("model.pt", "checkpoint.pt", "history.json", "metrics.json", "learning_curves.png",
                 "confusion_matrix.png"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    cm = torch.tensor(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and int(cm.sum()) == metrics["test_size"]
    assert abs(float(cm.trace()) / metrics["test_size"] - metrics["test_accuracy"]) < 1e-6
    assert metrics["test_accuracy"] > 0.9
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "seconds"} <= set(history[0])
    ckpt = load_checkpoint(trained_run / "model.pt")
    assert ckpt["meta"]["recipe"]["name"] == "best" and ckpt["meta"]["seed"] == 0


def _train_args(out):
    return [sys.executable, "-m", "convlens", "train", "--out", str(out), "--epochs", "5", "--subset", "6000",
            "--threads", "1", "--quiet", "--seed", "3"]


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_args(full), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_train_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and not (killed / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    done = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert 1 <= done < 5
    subprocess.run(_train_args(killed) + ["--resume"], check=True, capture_output=True, timeout=300)
    a = load_checkpoint(full / "model.pt")["state_dict"]
    b = load_checkpoint(killed / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]


def test_bad_training_arguments(tmp_path):
    assert_clean_error(run_cli("train", "--epochs", "0", "--out", tmp_path), "--epochs")
    assert_clean_error(run_cli("train", "--batch-size", "-3", "--out", tmp_path), "--batch-size")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.geteuid() != 0:  # root ignores permissions
            assert_clean_error(run_cli("train", "--out", locked / "sub", "--epochs", "1"), "cannot create")
        blocker = tmp_path / "file"
        blocker.write_text("x")
        assert_clean_error(run_cli("train", "--out", blocker / "sub", "--epochs", "1"), "cannot create")
    finally:
        os.chmod(locked, 0o700)


def test_bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    assert_clean_error(run_cli("summary", "--model", junk), "not a convlens checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"format": "convlens-checkpoint", "arch": "labnet",
                "state_dict": torch.nn.Linear(3, 2).state_dict()}, other)
    assert_clean_error(run_cli("summary", "--model", other), "do not fit")
    assert_clean_error(run_cli("summary", "--model", tmp_path / "nope"), "no such")


def test_weight_average_follows_its_recurrence():
    """a ← a + (1 − d_t)(w − a), d_t = min(decay, (1 + t)/(10 + t)); integer buffers are left alone."""
    from convlens.training import WeightAverage

    net = torch.nn.Linear(1, 1, bias=False)
    net.register_buffer("count", torch.tensor(7))
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg = WeightAverage(net, decay=0.5)
    expected = 1.0
    for t, w in enumerate([3.0, -2.0, 10.0], start=1):
        with torch.no_grad():
            net.weight.fill_(w)
            net.count.fill_(100 + t)
        avg.update(net)
        d = min(0.5, (1 + t) / (10 + t))
        expected = expected + (1 - d) * (w - expected)
        assert float(avg.average["weight"]) == pytest.approx(expected, rel=1e-6)
    assert int(avg.average["count"]) == 7
    restored = WeightAverage(net, 0.5, avg.state())
    assert restored.steps == 3 and torch.equal(restored.average["weight"], avg.average["weight"])


def test_default_recipe_keeps_the_last_weight_average():
    from convlens.training import RECIPES

    assert RECIPES["best"].ema_decay == 0.999 and RECIPES["best"].keep == "last"
    assert RECIPES["lab"].ema_decay == 0.0 and RECIPES["lab"].keep == "best-val"


def test_kept_weights_are_the_last_average(trained_run):
    """The default recipe keeps the last epoch's averaged weights (not the raw ones, not an earlier epoch)."""
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    model = load_checkpoint(trained_run / "model.pt")
    history = json.loads((trained_run / "history.json").read_text())
    assert model["meta"]["selected_epoch"] == len(history) == ckpt["epoch"]
    average = ckpt["average"]["average"]
    assert all(torch.equal(model["state_dict"][k], average[k]) for k in average)
    assert any(not torch.equal(ckpt["state_dict"][k], average[k]) for k in average)  # raw weights differ
