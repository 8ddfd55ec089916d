"""Model profiles, your own network (factory + weights), labelled folders, and `convlens report`."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli

from convlens.cli import main
from convlens.errors import ConvlensError
from convlens.models import load_model
from convlens.models.profile import Preprocessing

USER = Path(__file__).parent / "user_models" / "tinyres.py"
CLASSES = ["circle", "square", "stripes"]


def shapes_image(kind: str, rng: np.random.Generator) -> Image.Image:
    a = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
    yy, xx = np.mgrid[:48, :64]
    if kind == "circle":
        a[((yy - 24) ** 2 + (xx - 32) ** 2) < 150] = 255
    elif kind == "square":
        a[12:36, 20:44] = 255
    else:
        a[:, ::6] = 255
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """tinyres weights (.pt and .safetensors), a profile, and a labelled folder of three classes."""
    root = tmp_path_factory.mktemp("user")
    import importlib.util
    spec = importlib.util.spec_from_file_location("tinyres_ref", USER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.build()
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / "w.pt")
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(root / "w.safetensors"))
    (root / "profile.json").write_text(json.dumps({"input_size": [64, 64], "resize": "stretch",
                                                   "class_names": CLASSES, "name": "tinyres"}))
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            shapes_image(name, rng).save(root / "data" / name / f"{i}.png")
    (root / "data" / "square" / "broken.png").write_bytes(b"not a png")
    return {"root": root, "model": model.eval(), "factory": f"{USER}:build", "profile": root / "profile.json"}


def test_lite0_preprocessing_is_bit_identical_to_the_reference(lite0):
    from convlens.data.images import imagenet_preprocess, open_image, package_photos_dir

    img = open_image(package_photos_dir() / "chelsea.png")
    assert torch.equal(lite0.preprocess(img), imagenet_preprocess(img))
    assert lite0.input_range == (-127 / 128, 1.0)


def test_preprocessing_formula_and_inverse():
    pre = Preprocessing(size=(4, 6), channel_order="BGR", resize="stretch", scale=1 / 255, mean=(0.5, 0.4, 0.3),
                        std=(0.2, 0.25, 0.5))
    arr = np.random.default_rng(1).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    x = pre(Image.fromarray(arr))
    expected = (arr[:, :, ::-1].astype(np.float32) / 255 - np.array([0.5, 0.4, 0.3], np.float32)) / \
        np.array([0.2, 0.25, 0.5], np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(pre.deprocess(x), arr / 255.0, atol=1e-6)
    lo, hi = pre.value_range
    assert lo == pytest.approx(min((0 - m) / s for m, s in zip((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))))
    assert hi == pytest.approx(max((1 - m) / s for m, s in zip((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))))
    unit = torch.from_numpy(arr[:, :, :].astype(np.float32) / 255).permute(2, 0, 1)[None]
    np.testing.assert_allclose(pre.from_unit(unit)[0].numpy(), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("weights", ["w.pt", "w.safetensors"])
def test_factory_with_weights_equals_the_native_model(user_files, weights):
    loaded = load_model(user_files["factory"], weights=str(user_files["root"] / weights),
                        profile=user_files["profile"])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), user_files["model"](x))
    assert loaded.class_names == CLASSES and loaded.profile.input_shape == (3, 64, 64)
    assert loaded.profile.stats_layers == ["stem", "down", "layer2"]


def test_profile_inferred_without_a_file(user_files):
    loaded = load_model(user_files["factory"], weights=str(user_files["root"] / "w.pt"))
    assert loaded.profile.input_shape == (3, 224, 224)
    assert loaded.class_names == ["0", "1", "2"]
    assert loaded.profile.value_range == pytest.approx(((0 - 0.485) / 0.229, (1 - 0.406) / 0.225))


@pytest.mark.parametrize("spec, weights, profile, fragment", [
    ("{user}:missing", None, None, "has no 'missing'"),
    ("{user}:broken", None, None, "raised RuntimeError"),
    ("{user}:build", "{root}/nothing.pt", None, "no such file"),
    ("{user}:build", "{lab}", None, "do not fit the model"),
    ("{user}:build", None, {"input_size": 64, "colour": "RGB"}, "unknown key"),
    ("{user}:build", None, {"input_size": "big"}, "wrong type"),
    ("{user}:build", None, {"class_names": ["a", "b"]}, "2 class names for a model with 3 outputs"),
    ("{user}:build", None, {"channel_order": "L"}, "first convolution takes 3"),
    ("efficientnet-lite0", "{root}/w.pt", None, "--weights applies to a factory"),
])
def test_bad_user_models_give_one_clear_line(user_files, trained_run, tmp_path, capsys, spec, weights, profile,
                                             fragment):
    fill = {"user": USER, "root": user_files["root"], "lab": trained_run / "model.pt"}
    args = ["summary", "--model", spec.format(**fill)]
    if weights:
        args += ["--weights", weights.format(**fill)]
    if profile is not None:
        (tmp_path / "p.json").write_text(json.dumps(profile))
        args += ["--profile", str(tmp_path / "p.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_summary_prints_profile_and_layers(user_files, capsys):
    assert main(["summary", "--model", user_files["factory"], "--weights", str(user_files["root"] / "w.pt"),
                 "--profile", str(user_files["profile"])]) == 0
    out = capsys.readouterr().out
    assert "input: 3×64×64 (RGB)" in out and "classes: circle, square, stripes" in out
    assert re.search(r"layer2\.conv2\s+Conv2d\s+16×16×16\s+2,304", out)
    assert f"Total params: {sum(p.numel() for p in user_files['model'].parameters()):,}" in out


def test_labelled_folder_matching(tmp_path):
    from convlens.data.folders import match_classes, scan_labelled_folder

    assert match_classes(["Tabby", "tench"], ["tench", "goldfish", "tabby"]) == ([2, 0], ["tench", "goldfish", "tabby"])
    assert match_classes(["a", "b"], ["0", "1"]) == ([0, 1], ["a", "b"])
    with pytest.raises(ConvlensError, match="match no class"):
        match_classes(["tabby", "zebra-ish"], ["tabby", "b", "c"])
    with pytest.raises(ConvlensError, match="one sub-folder per class"):
        scan_labelled_folder(tmp_path, ["0"])


def test_folder_statistics_stream_equal_one_pass_over_tensors(user_files, tmp_path):
    """Statistics of the folder (streamed, a corrupt file skipped) equal collect() over the same tensors."""
    from convlens import stats as fstats
    from convlens.analysis import statistics
    from convlens.data.images import open_image

    loaded = load_model(user_files["factory"], weights=str(user_files["root"] / "w.pt"), profile=user_files["profile"])
    summary = statistics(loaded, tmp_path / "s", data=str(user_files["root"] / "data"), progress=False)
    assert len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]
    assert summary["counts"] == [4, 4, 4] and summary["classes"] == CLASSES
    xs, ys = [], []
    for c, name in enumerate(CLASSES):
        for i in range(4):
            xs.append(loaded.preprocess(open_image(user_files["root"] / "data" / name / f"{i}.png")))
            ys.append(c)
    ref = fstats.collect(loaded.model, [(torch.stack(xs), torch.tensor(ys))], loaded.profile.stats_layers, 3)
    saved = np.load(tmp_path / "s" / "stats.npz")
    for layer in loaded.profile.stats_layers:
        np.testing.assert_allclose(saved[f"{layer}/mean_map"], ref.layer(layer)["mean_map"], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(saved[f"{layer}/rank"], ref.layer(layer)["rank"])


def test_predict_reads_expected_classes_from_folders(user_files, capsys):
    code = main(["predict", str(user_files["root"] / "data"), "--model", user_files["factory"],
                 "--weights", str(user_files["root"] / "w.pt"), "--profile", str(user_files["profile"]), "--top", "2"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err  # the corrupt file is named, the rest predicted
    rows = [line for line in captured.out.splitlines()[1:] if line.strip()]
    assert len(rows) == 12
    assert all(line.split()[1] in CLASSES and line.rstrip().endswith(("TRUE", "FALSE")) for line in rows)


@pytest.mark.slow
def test_report_on_a_user_model_is_one_self_contained_page(user_files, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("report", "--model", user_files["factory"], "--weights", user_files["root"] / "w.pt",
                   "--profile", user_files["profile"], "--data", user_files["root"] / "data", "--out", out,
                   "--quiet", "--threads", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text("utf-8")
    assert Path(proc.stdout.strip().splitlines()[-1]) == (out / "index.html").resolve()
    assert 'src="data:image/png;base64,' in page and not re.search(r'<img src="(?!data:)', page)
    for section in ("data", "stats", "actmax", "explain", "faith"):
        assert f'id="{section}"' in page
    summary = json.loads((out / "summary.json").read_text())
    loaded = load_model(str(USER) + ":build", weights=str(user_files["root"] / "w.pt"), profile=user_files["profile"])
    from convlens.data.images import open_image
    correct = 0
    for c, name in enumerate(CLASSES):
        for i in range(4):
            x = loaded.preprocess(open_image(user_files["root"] / "data" / name / f"{i}.png"))[None]
            correct += int(loaded.model(x).argmax(1)) == c
    assert summary["accuracy"] == pytest.approx(correct / 12)
    assert np.array(summary["confusion"]).sum() == 12
    again = run_cli("report", "--model", user_files["factory"], "--weights", user_files["root"] / "w.pt",
                    "--profile", user_files["profile"], "--data", user_files["root"] / "data", "--out", out,
                    "--quiet", "--threads", "1", timeout=600)
    assert again.returncode == 0
    record = json.loads((out / "summary.json").read_text())["run"]["timings"]
    assert all(v.get("cached") for k, v in record.items() if k != "total")


def test_report_bad_data_folder(tmp_path, user_files):
    (tmp_path / "flat").mkdir()
    proc = run_cli("report", "--model", user_files["factory"], "--data", tmp_path / "flat", "--out", tmp_path / "o")
    assert_clean_error(proc, "one sub-folder per class")
    assert not (tmp_path / "o").exists()


def test_onnx_model_through_load_model(trained_run, tmp_path):
    """The lab network exported to ONNX: same predictions, statistics layers at the three conv blocks."""
    pytest.importorskip("onnx")
    native = load_model(str(trained_run))
    path = tmp_path / "lab.onnx"
    torch.onnx.export(native.model, torch.zeros(1, 1, 28, 28), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    loaded = load_model(str(path), profile={"input_size": 28, "channel_order": "L", "resize": "stretch"})
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), native.model(x), atol=1e-5, rtol=1e-5)
    assert [name.split("_")[0] for name in loaded.profile.stats_layers] == ["l1", "l2", "l3"]
    assert loaded.class_names == [str(i) for i in range(10)]
