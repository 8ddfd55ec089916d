"""Figures: the display normalization of attribution maps, readable layouts (no text drawn over other
text or over another panel), and progress lines without a terminal."""
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from conftest import ROOT
from convlens import progress as prog
from convlens.plots import actmax as aplots
from convlens.plots import attribution as atplots
from convlens.plots import evaluation as eplots
from convlens.plots import stats as splots
from convlens.plots import training as tplots

# ---------------------------------------------------------------- display normalization


def test_display_map_clips_at_the_99th_percentile_of_the_magnitude():
    values = np.arange(1, 1001, dtype=float)  # |v| percentile 99 (linear interpolation) = 990.01
    q = np.percentile(values, 99)
    assert q == pytest.approx(990.01)
    shown = atplots.display_map(values, signed=False)
    assert shown[:990] == pytest.approx(values[:990] / q)
    assert (shown[990:] == 1.0).all()  # the top 1 % saturate
    assert shown[499] == pytest.approx(500 / 990.01)


def test_display_map_one_outlier_no_longer_hides_the_map():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(64, 64))
    values[5, 5] = 1e4  # a single extreme gradient
    by_max = np.abs(values) / np.abs(values).max()
    shown = atplots.display_map(values, signed=False)
    assert np.median(by_max) < 1e-3  # max scaling: everything but one pixel looks black
    assert 0.2 < np.median(shown) < 0.4  # robust scaling: |N(0,1)| median 0.67 over its 99th percentile ~2.6
    assert shown[5, 5] == 1.0


def test_display_map_signed_is_odd_and_keeps_zero_at_zero():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 20, 20)) * np.array([1.0, 5.0, 0.1])[:, None, None]
    values[0, 0, :5] = 0.0
    shown = atplots.display_map(values, signed=True)
    assert shown.shape == values.shape
    assert np.allclose(atplots.display_map(-values, signed=True), -shown)
    assert (shown[0, 0, :5] == 0).all()
    assert shown.min() == -1.0 and shown.max() == 1.0
    q = np.percentile(np.abs(values), 99)  # one scale for all channels: colours keep their balance
    inside = np.abs(values) < q
    assert np.allclose(shown[inside], values[inside] / q)
    assert np.allclose(atplots.display_map(values, signed=False), np.abs(shown))


def test_display_map_of_a_flat_or_broken_map_is_zeros_not_nan():
    for flat in (np.zeros((8, 8)), np.full((8, 8), np.nan), np.array([[np.inf, -np.inf], [0.0, 0.0]])):
        for signed in (True, False):
            shown = atplots.display_map(flat, signed=signed)
            assert np.isfinite(shown).all() and (shown == 0).all()
    assert atplots.display_map(np.empty((0,)), signed=True).size == 0


def test_display_map_of_a_sparse_map_scales_on_its_maximum():
    values = np.zeros(1000)
    values[[3, 7]] = [2.0, -4.0]  # fewer non-zeros than 1 %: the 99th percentile is 0
    assert np.allclose(atplots.display_map(values, signed=True)[[3, 7]], [0.5, -1.0])


def test_display_traits_come_from_the_method_classes():
    from convlens.attribution import METHODS

    def having(trait):
        return {name for name, cls in METHODS.items() if getattr(cls, trait, False)}

    assert having("gradient_image") == {"guided-backprop", "deconvnet", "guided-gradcam"}
    assert {"input-x-gradient", "integrated-gradients"} <= having("signed")
    assert not having("signed") & {"gradcam", "gradcam++", "layercam", "xgradcam", "saliency", "scorecam"}
    assert atplots.method_traits("integrated-gradients") == (False, True)
    assert atplots.method_traits("guided-backprop") == (True, False)
    assert atplots.method_traits("gradcam") == (False, False)
    assert atplots.method_traits("not-a-method") == (False, False)


def test_method_panels_follow_the_display_rules():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(16, 16, 3))
    raw = rng.normal(size=(3, 16, 16))
    # guided backprop on a colour image: the gradient itself, grey = 0
    panel = atplots.method_panel("guided-backprop", image, raw, np.abs(raw).max(0))
    assert np.allclose(panel, 0.5 + 0.5 * atplots.display_map(raw.transpose(1, 2, 0), signed=True))
    # integrated gradients: channel sum, red where positive, blue where negative, the image where zero
    ig = np.zeros((3, 16, 16))
    ig[:, 2, 2], ig[:, 9, 9] = 1.0, -1.0
    panel = atplots.method_panel("integrated-gradients", image, ig, ig.sum(0))
    backdrop = atplots.dimmed(image)
    assert np.allclose(panel[0, 0], backdrop[0, 0])
    assert panel[2, 2, 0] > 0.6 > panel[2, 2, 2]  # red
    assert panel[9, 9, 2] > 0.6 > panel[9, 9, 0]  # blue
    # Grad-CAM (coarse raw map): jet over the image at half opacity, scaled without the min-max floor
    cam_raw = rng.uniform(size=(4, 4))
    heat = np.kron(cam_raw, np.ones((4, 4)))
    panel = atplots.method_panel("gradcam", image, cam_raw, heat)
    assert np.allclose(panel, atplots.overlay(image, atplots.display_map(heat, signed=False)))
    # guided backprop on a grey input: the sign of the gradient in colour
    grey_raw = np.zeros((1, 16, 16))
    grey_raw[0, 3, 3], grey_raw[0, 5, 5] = 2.0, -2.0
    panel = atplots.method_panel("guided-backprop", image[..., 0], grey_raw, np.abs(grey_raw[0]))
    assert panel[3, 3, 0] > 0.6 > panel[3, 3, 2] and panel[5, 5, 2] > 0.6 > panel[5, 5, 0]
    # saliency (per pixel, unsigned): zero gradient shows the dimmed image
    grad = np.zeros((3, 16, 16))
    grad[1, 4, 4] = 3.0
    panel = atplots.method_panel("saliency", image, grad, np.abs(grad).max(0))
    assert np.allclose(panel[0, 0], backdrop[0, 0])
    assert not np.allclose(panel[4, 4], backdrop[4, 4])


def test_explain_shows_guided_backprop_on_a_photo_with_contrast(tmp_path, lite0):
    """The issue's case: on EfficientNet-Lite0 a few extreme gradients made the max-scaled map a flat grey
    square; the robust display spreads the same map over the grey scale."""
    from convlens.data.images import sample_photo_paths
    from convlens.explain import explain

    photo = [p for p in sample_photo_paths() if p.name == "chelsea.png"]
    explain(lite0, photo, tmp_path, methods=["guided-backprop"], progress=False, overlays=[])
    raw = np.load(tmp_path / "maps.npz")["guided-backprop_raw"][0]
    by_max = np.abs(raw) / np.abs(raw).max()
    shown = np.abs(atplots.display_map(raw, signed=True))
    assert np.percentile(by_max, 90) < 0.05  # the old display: within 5 % of grey almost everywhere
    assert np.percentile(shown, 90) > 4 * np.percentile(by_max, 90)
    assert np.percentile(shown, 90) > 0.15
    assert (tmp_path / "chelsea_methods.png").exists()


# ---------------------------------------------------------------- layouts: no overlapping text


def drawn_texts(fig) -> list[Text]:
    """Every non-empty text artist the renderer draws (tick labels only for ticks in view)."""
    texts = [t for t in fig.texts if t.get_visible() and t.get_text().strip()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_visible() and t.get_text()]
        texts += [t for t in ax.texts if t.get_visible() and t.get_text().strip()]
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if axis.label.get_visible() and axis.label.get_text():
                texts.append(axis.label)
            lo, hi = sorted(axis.get_view_interval())
            span = hi - lo
            for tick in axis.get_major_ticks():
                loc = tick.get_loc()
                if loc is None or not lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                    continue
                texts += [lab for lab in (tick.label1, tick.label2) if lab.get_visible() and lab.get_text()]
    return texts


def overlaps(a, b, tolerance: float = 1.0) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance)


def layout_problems(fig) -> list[str]:
    """Text over text, and text over a panel it does not belong to."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = drawn_texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    problems = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if overlaps(boxes[i], boxes[j]):
                problems.append(f"text {texts[i].get_text()!r} overlaps {texts[j].get_text()!r}")
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
    for t, box in zip(texts, boxes):
        for ax in panels:
            if ax is not t.axes and overlaps(box, ax.get_window_extent(renderer)):
                problems.append(f"text {t.get_text()!r} lies over another panel")
    return problems


@pytest.fixture
def captured(monkeypatch):
    """Figures handed to save_figure, kept open for inspection instead of written."""
    figs = []

    def keep(fig, path, dpi=110):
        figs.append(fig)
        return path

    for module in (aplots, atplots, eplots, splots, tplots):
        monkeypatch.setattr(module, "save_figure", keep)
    yield figs
    import matplotlib.pyplot as plt
    for fig in figs:
        plt.close(fig)


def fake_stats(rng, classes=10):
    out = {}
    for layer, (k, size) in {"l1": (9, 28), "l2": (9, 14), "l3": (16, 7)}.items():
        mean_map = rng.uniform(size=(classes, k, size, size))
        score = mean_map.mean((2, 3))
        rank = np.argsort(np.argsort(-score, axis=1), axis=1) + 1
        out[layer] = {"mean_map": mean_map, "score": score, "rank": rank}
    return out


def figure_builders():
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(10)]
    stats = fake_stats(rng)
    loaded = SimpleNamespace(class_names=names)
    tvs = [0.125, 0.25, 0.5, 1, 2, 4, 8, 16]
    methods = ["gradcam", "gradcam++", "layercam", "xgradcam", "saliency", "guided-backprop", "deconvnet",
               "guided-gradcam", "input-x-gradient", "integrated-gradients", "smoothgrad", "scorecam"]
    table = {m: {"deletion_auc": rng.uniform(0, 0.4), "insertion_auc": rng.uniform(0.8, 1.0),
                 "average_drop": rng.uniform(0, 70), "increase_in_confidence": 0.0} for m in methods}
    fractions = np.linspace(0, 1, 29).tolist()
    curves = {m: {"fractions": fractions, "deletion_mean": np.linspace(1, 0, 29).tolist(), "deletion_auc": 0.3,
                  "insertion_mean": np.linspace(0, 1, 29).tolist(), "insertion_auc": 0.9} for m in methods}
    layers = ["l5", "l4", "l3", "l2", "l1"]
    sanity = {"mode": "cascading", "steps": [
        {"randomized": layers[:i + 1], **{m: {"spearman_abs": 0.5, "ssim": 0.4} for m in methods[:5]}}
        for i in range(5)]}
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 1 - 0.1 / e,
                "val_accuracy": 1 - 0.12 / e} for e in range(1, 11)]
    image = rng.uniform(size=(224, 224, 3))
    panels = {m: rng.uniform(size=(224, 224, 3)) for m in ["gradcam", "guided-gradcam", "kerasvis-guided-gradcam",
                                                           "gradcam++", "layercam", "xgradcam", "saliency",
                                                           "guided-backprop"]}
    digits = rng.uniform(size=(10, 28, 28))
    return {
        "feature maps l1": lambda p: splots.plot_feature_maps(digits[7], rng.uniform(size=(9, 28, 28)), "l1", p,
                                                              "l1: test image 0 (digit 7)"),
        "feature maps l3": lambda p: splots.plot_feature_maps(digits[7], rng.uniform(size=(16, 7, 7)), "l3", p,
                                                              "l3: test image 0 (digit 7)"),
        "all digits l1": lambda p: splots.plot_all_digits(digits, rng.uniform(size=(10, 9, 28, 28)), "l1", p, names),
        "all digits l3": lambda p: splots.plot_all_digits(digits, rng.uniform(size=(10, 16, 7, 7)), "l3", p, names),
        "kernels": lambda p: splots.plot_kernels(rng.normal(size=(9, 1, 5, 5)), p),
        "rank overlay": lambda p: splots.plot_rank_overlay(stats, digits, p, names),
        "score heat maps": lambda p: splots.plot_score_heatmaps(stats, p, names),
        "score bars": lambda p: splots.plot_score_bars(stats["l3"], "l3", p, names),
        "class probability": lambda p: splots.plot_class_probability(stats, p, names),
        "ranked maps": lambda p: splots.plot_ranked_maps(stats["l3"], "l3", p, names),
        "actmax sweep": lambda p: aplots.plot_sweep(torch.rand(80, 1, 28, 28), list(range(10)), tvs, 4,
                                                    rng.uniform(size=(8, 10)), loaded, p),
        "actmax sweep with judge": lambda p: aplots.plot_sweep(
            torch.rand(80, 1, 28, 28), list(range(10)), tvs, 4, rng.uniform(size=(8, 10)), loaded, p,
            counts=[9] * 8, label="Activation maximization (pixels, mean-image start)", pair_counts=[3] * 8),
        "actmax pair sweep": lambda p: aplots.plot_pair_sweep(
            torch.rand(32, 1, 28, 28), [(1, 7), (4, 9), (0, 1), (7, 8)], tvs, [16, 5, 30, 11],
            [{"judge_recognized": k % 3 == 0, "both_top2": k % 2 == 0, "judge_probability": 0.31} for k in range(32)],
            loaded, p, label="Activation maximization (pixels, mean-image start)"),
        "actmax pair judged": lambda p: aplots.plot_pair(
            torch.rand(1, 28, 28), {"targets": [1, 7], "tv_weight": 4, "target_probabilities": [0.46, 0.37],
                                    "judge_recognized": True, "judge_top_by": {"cnn": ["7", "1"], "mlp": ["1", "7"]}},
            loaded, p),
        "actmax row": lambda p: aplots.plot_row(torch.rand(10, 1, 28, 28), [f"{i}\np=1.00" for i in range(10)],
                                                "Class images at the chosen tv weight 4", p),
        "actmax pair": lambda p: aplots.plot_pair(torch.rand(1, 28, 28), {"targets": [1, 7], "tv_weight": 4,
                                                                          "target_probabilities": [0.46, 0.37]},
                                                  loaded, p),
        "metrics": lambda p: eplots.plot_metric_table(table, p),
        "deletion/insertion": lambda p: eplots.plot_curves(curves, p),
        "sanity": lambda p: eplots.plot_sanity(sanity, p),
        "learning curves": lambda p: tplots.plot_learning_curves(history, p),
        "confusion": lambda p: tplots.plot_confusion(rng.integers(0, 300, size=(10, 10)), p, names),
        "overlay": lambda p: atplots.plot_overlay(image, panels["gradcam"], "gradcam: tiger cat", p),
        "signed overlay": lambda p: atplots.plot_overlay(image, panels["guided-gradcam"], "guided-gradcam: tiger cat",
                                                         p, signed=True),
        "methods": lambda p: atplots.plot_methods(image, panels, "chelsea.png: tiger cat", p),
    }


@pytest.mark.parametrize("name", list(figure_builders()))
def test_figure_text_does_not_overlap(name, captured, tmp_path):
    figure_builders()[name](tmp_path / "f.png")
    assert len(captured) == 1
    assert layout_problems(captured[0]) == []


def test_the_overlap_check_catches_a_title_over_labels(captured):
    """The check itself: a suptitle placed over the panel titles is reported."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(4, 1.5))
    for i, ax in enumerate(axes):
        ax.imshow(np.zeros((4, 4)))
        ax.set_title(f"filter {i}")
    fig.suptitle("a long title that runs over the filter labels", y=0.86)
    captured.append(fig)
    assert any("overlaps" in p for p in layout_problems(fig))


def test_metric_bars_leave_room_for_their_value_labels(captured, tmp_path):
    eplots.plot_metric_table({"a": {"deletion_auc": 0.4, "insertion_auc": 0.9, "average_drop": 60.0,
                                    "increase_in_confidence": 0.0}}, tmp_path / "m.png")
    fig = captured[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for t in ax.texts:
            assert t.get_window_extent(renderer).x1 <= frame.x1 + 1, t.get_text()
        lo, hi = ax.get_xlim()
        assert lo <= 0 < hi  # bars start at 0, also when every value is 0


# ---------------------------------------------------------------- progress without a terminal


class Log(io.StringIO):
    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_prints_one_line_per_epoch_and_keeps_inner_loops_quiet():
    log = Log()
    epochs = prog.progress(range(3), desc="training", unit="epoch", per_item=True, stream=log)
    for e in epochs:
        for _ in prog.progress(range(50), desc=f"epoch {e + 1}/3", unit="batch", stream=log):
            pass
        epochs.set_postfix(loss=f"{1 / (e + 1):.4f}")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 3
    assert lines[0].startswith("training: epoch 1/3, loss=1.0000 (")
    assert lines[2].startswith("training: epoch 3/3, loss=0.3333 (")


def test_progress_in_a_log_summarizes_a_top_level_loop_in_one_line():
    log = Log()
    assert list(prog.progress(iter(range(40)), desc="statistics", unit="batch", stream=log)) == list(range(40))
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statistics: 40 batches in ")
    prog.progress(range(3), desc="x", stream=log)  # created, never iterated, dropped: nothing left open
    log2 = Log()
    list(prog.progress(range(2), desc="methods", unit="method", stream=log2))
    assert log2.getvalue().startswith("methods: 2 methods in ")


def test_progress_manual_stages_and_switched_off():
    log = Log()
    bar = prog.progress(desc="lab", total=2, unit="stage", per_item=True, stream=log)
    bar.set_description("lab: training")
    bar.update()
    bar.set_description("lab: report")
    bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["lab: training: stage 1/2", "lab: report: stage 2/2"]
    quiet = Log()
    bar = prog.progress(range(4), desc="x", enabled=False, stream=quiet)
    bar.set_postfix(a=1)
    assert list(bar) == [0, 1, 2, 3] and quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm import tqdm

    term = Terminal()
    bar = prog.progress(range(3), desc="training", stream=term)
    assert isinstance(bar, tqdm)
    list(bar)
    assert "\r" in term.getvalue()


@pytest.mark.slow
def test_cli_train_with_stderr_piped_writes_one_plain_line_per_epoch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "convlens", "train", "--out", str(tmp_path / "run"),
                           "--epochs", "3", "--subset", "1000", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"training: epoch {e}/3" for e in (1, 2, 3)]
    assert all("val_acc=" in ln for ln in lines)


def test_progress_left_by_an_error_adds_no_line():
    log = Log()
    with pytest.raises(RuntimeError):
        for i in prog.progress(range(5), desc="methods", unit="method", stream=log):
            if i == 2:
                raise RuntimeError("boom")
    assert log.getvalue() == ""
    list(prog.progress(range(2), desc="after", stream=log))  # nothing left open: the next loop reports
    assert log.getvalue().startswith("after: 2 items in ")
