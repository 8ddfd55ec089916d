import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli
from convlens.data.images import package_photos_dir


def test_predict_table_for_shipped_photos():
    proc = run_cli("predict", package_photos_dir() / "coffee.png", package_photos_dir() / "camera.png")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "expected" in lines[0] and "OK" in lines[0]
    assert "espresso" in lines[1] and "TRUE" in lines[1]
    assert "tripod" in lines[2] and "TRUE" in lines[2]


def test_explain_skips_a_corrupt_file_and_processes_the_rest(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    proc = run_cli("explain", package_photos_dir() / "coffee.png", bad, "--out", out, "--methods",
                   "gradcam,guided-gradcam,kerasvis-guided-gradcam", "--quiet")
    assert proc.returncode == 1
    assert "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in summary["predictions"]] == ["coffee.png"]
    assert summary["predictions"][0]["predicted"] == "espresso"
    maps = np.load(out / "maps.npz")
    assert list(maps["images"]) == ["coffee.png"]
    assert maps["gradcam_raw"].shape == (1, 7, 7) and maps["gradcam_map"].shape == (1, 224, 224)
    assert maps["guided-gradcam_raw"].shape == (1, 3, 224, 224)
    assert sorted(p.name for p in out.iterdir()) == ["coffee_methods.png", "maps.npz", "predictions.json"]


def test_explain_on_the_lab_network(trained_run, tmp_path):
    digit = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    proc = run_cli("explain", tmp_path / "digit.png", "--model", trained_run, "--out", tmp_path / "o",
                   "--methods", "gradcam,scorecam,guided-backprop", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["layers"]["gradcam"] == "l3"


def test_explain_bad_input(tmp_path):
    photo = package_photos_dir() / "coffee.png"
    assert_clean_error(run_cli("explain", photo, "--out", tmp_path, "--layer", "nope", "--methods", "gradcam"),
                       "available layers")
    assert_clean_error(run_cli("explain", photo, "--out", tmp_path, "--target", "5000", "--methods", "gradcam"),
                       "out of range")
    assert_clean_error(run_cli("explain", photo, "--out", tmp_path, "--methods", "magic"), "unknown method")
    assert_clean_error(run_cli("explain", tmp_path / "missing.png", "--out", tmp_path), "no such file")


@pytest.mark.slow
def test_explain_all_methods_on_the_lab_network(trained_run, tmp_path):
    from convlens.attribution import METHODS

    digit = (np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    proc = run_cli("explain", tmp_path / "digit.png", "--model", trained_run, "--out", tmp_path / "o",
                   "--methods", "all", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["methods"] == [m for m in METHODS if m != "cam"]  # no GAP → linear head on the lab network
    maps = np.load(tmp_path / "o" / "maps.npz")
    for name in summary["methods"]:
        assert np.isfinite(maps[f"{name}_map"]).all() and np.abs(maps[f"{name}_map"]).sum() > 0, name
    proc = run_cli("explain", tmp_path / "digit.png", "--model", trained_run, "--out", tmp_path / "t",
                   "--methods", "smoothgrad:gradcam,vargrad:lrp", "--quiet")
    assert proc.returncode == 0, proc.stderr
    maps = np.load(tmp_path / "t" / "maps.npz")
    assert maps["smoothgrad:gradcam_map"].shape == (1, 28, 28) and np.abs(maps["vargrad:lrp_map"]).sum() > 0
