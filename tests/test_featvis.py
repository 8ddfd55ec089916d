import json

import pytest
import torch

from conftest import assert_clean_error, run_cli
from convlens.errors import ConvlensError
from convlens.featvis import ActMaxConfig, channel, class_logit, maximize, unit
from convlens.featvis.objectives import LOGITS, soft_min
from convlens.featvis.regularizers import lp_norm, total_variation
from convlens.featvis.run import choose_tv_weight


def outputs():
    return {LOGITS: torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
            "conv": torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3)}


def test_objective_algebra_and_immutability():
    a, b = class_logit(0), class_logit(2)
    o = outputs()
    combo = 2 * a - b + channel("conv", 1) * 0.5
    expected = 2 * o[LOGITS][:, 0] - o[LOGITS][:, 2] + 0.5 * o["conv"][:, 1].mean((1, 2))
    assert torch.allclose(combo(o), expected)
    assert torch.equal(a(o), o[LOGITS][:, 0]) and torch.equal(b(o), o[LOGITS][:, 2])  # operands unchanged
    assert torch.allclose((a + a + a)(o), 3 * a(o))
    assert torch.allclose((a - (b - a))(o), 2 * a(o) - b(o))
    assert torch.allclose((-a)(o), -a(o))
    assert combo.layers == {LOGITS, "conv"}
    assert torch.equal(unit("conv", 1, 0, 2)(o), o["conv"][:, 1, 0, 2])
    with pytest.raises(AttributeError):
        a.description = "x"
    assert soft_min(a, b)(o).tolist() == pytest.approx(
        (-torch.logsumexp(-torch.stack([a(o), b(o)]), 0)).tolist())


def test_total_variation_and_lp_match_kerasvis_formulas():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]]])
    # grid (H-1)x(W-1): (0,0): dx=1, dy=2 → 5; (0,1): dx=2, dy=1 → 5; (1,0): dx=0, dy=-1 → 1; (1,1): dx=-2, dy=-2 → 8
    assert float(total_variation(x, 2.0)) == pytest.approx(19 / 9)
    assert float(total_variation(x, 1.0)) == pytest.approx((5 ** 0.5 * 2 + 1 + 8 ** 0.5) / 9, rel=1e-5)
    assert float(lp_norm(x, 6.0)) == pytest.approx(float((x.abs() ** 6).sum() ** (1 / 6)) / 9, rel=1e-5)


def test_per_sample_tv_weights_in_one_batch_and_determinism(lab_model):
    objs = [class_logit(3)] * 3
    cfg = ActMaxConfig(steps=40, tv_weight=[0.0, 4.0, 64.0], seed=5)
    r1 = maximize(lab_model.model, objs, (1, 28, 28), cfg)
    r2 = maximize(lab_model.model, objs, (1, 28, 28), cfg)
    assert torch.equal(r1.images, r2.images)
    assert r1.tv[0] > r1.tv[1] > r1.tv[2]
    assert float(r1.images.min()) >= 0 and float(r1.images.max()) <= 1


def test_kerasvis_mode_rescales_each_image(lab_model):
    r = maximize(lab_model.model, [class_logit(1), class_logit(2)], (1, 28, 28),
                 ActMaxConfig(steps=30, mode="kerasvis", tv_weight=1.0))
    for img in r.display:
        assert abs(float(img.mean()) - 0.5) < 0.05
        assert float(img.std()) < 0.2


def test_bad_weights_and_steps(lab_model):
    with pytest.raises(ConvlensError, match="non-negative"):
        maximize(lab_model.model, [class_logit(1)], (1, 28, 28), ActMaxConfig(tv_weight=-1))
    with pytest.raises(ConvlensError, match="non-negative"):
        maximize(lab_model.model, [class_logit(1)], (1, 28, 28), ActMaxConfig(tv_weight=float("nan")))
    with pytest.raises(ConvlensError, match="steps"):
        maximize(lab_model.model, [class_logit(1)], (1, 28, 28), ActMaxConfig(steps=0))


def test_tv_weight_choice_criterion():
    probs = torch.tensor([[0.99, 0.95], [0.97, 0.91], [0.95, 0.5]]).numpy()
    assert choose_tv_weight([1.0, 2.0, 4.0], probs)[0] == 2.0
    assert choose_tv_weight([1.0, 2.0], torch.tensor([[0.5, 0.8], [0.7, 0.6]]).numpy())[0] == 2.0


def test_actmax_cli(trained_run, tmp_path):
    out = tmp_path / "am"
    proc = run_cli("actmax", "--model", trained_run, "--out", out, "--classes", "0-2", "--tv-weights", "1,8",
                   "--pairs", "1+7", "--layer", "l2", "--channels", "0-1", "--steps", "20", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "actmax.json").read_text())
    assert summary["chosen_tv_weight"] in (1.0, 8.0)
    assert len(summary["images"]) == 6 and len(summary["pairs"]) == 1 and len(summary["channels"]) == 2
    for rec in summary["images"] + summary["pairs"]:
        assert (out / rec["image"]).is_file()
        assert json.loads((out / "images" / f"{rec['name']}.json").read_text())["objective"] == rec["objective"]
    for name in summary["figures"].values():
        assert (out / name).is_file()


@pytest.mark.parametrize("args,fragment", [
    (["--classes", "12"], "out of range"), (["--layer", "l9"], "unknown layer"),
    (["--tv-weights", "-1"], "non-negative"), (["--steps", "0"], "steps"),
    (["--layer", "l2", "--channels", "40"], "channel out of range")])
def test_actmax_bad_input(trained_run, tmp_path, args, fragment):
    assert_clean_error(run_cli("actmax", "--model", trained_run, "--out", tmp_path, *args), fragment)


def test_actmax_on_efficientnet_with_fourier_colour(tmp_path):
    proc = run_cli("actmax", "--model", "efficientnet-lite0", "--out", tmp_path, "--classes", "967",
                   "--tv-weights", "0.5", "--pairs", "", "--steps", "4", "--param", "fourier", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "actmax.json").read_text())
    rec = summary["images"][0]
    assert rec["objective"] == "logit[967]" and 0 <= rec["target_probabilities"][0] <= 1
    from PIL import Image
    with Image.open(tmp_path / rec["image"]) as img:
        assert img.size == (224, 224) and img.mode == "RGB"


def test_fourier_param_gives_valid_colour_images():
    from convlens.featvis.param import FourierColorParam

    p = FourierColorParam(2, (16, 20), torch.Generator().manual_seed(0))
    img = p.image()
    assert img.shape == (2, 3, 16, 20) and float(img.min()) >= 0 and float(img.max()) <= 1
    img.sum().backward()
    assert p.spectrum.grad is not None and torch.isfinite(p.spectrum.grad).all()
