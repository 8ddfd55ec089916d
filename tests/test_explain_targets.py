"""`convlens explain` beyond one class: --target-region on segmentation models, --tokens on token layers.

The parsing and every bad input run in-process (``convlens.cli.main`` on tiny factory models, milliseconds);
the runs whose written maps are compared with the API's run as subprocesses (slow).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_clean_error, run_cli
from convlens import cli
from convlens.attribution import make_method, method_info, region_target
from convlens.errors import ConvlensError
from convlens.explain import predict
from convlens.explain_targets import RegionSpec, box_mask, parse_grid, parse_region, read_mask
from convlens.models import load_model
from convlens.models.profile import TokenLayout, token_layout_from
from convlens.models.summary import describe

SEG = str(ROOT / "tests" / "user_models" / "tinyseg.py") + ":build"
VIT = str(ROOT / "tests" / "user_models" / "tinyvit.py") + ":build"


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def run(capsys, *args) -> Result:
    """``convlens ARGS`` in-process: exit code and stderr."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    return Result(code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


def cell_mask_png(path: Path, rows: slice, cols: slice, scale: int = 4, grid=(16, 16)) -> torch.Tensor:
    """A mask image ``scale`` times the grid, its region whole cells: any nearest-neighbour sample of a cell
    reads the cell. Returns the (H, W) grid mask it stands for."""
    cells = np.zeros(grid, dtype=np.uint8)
    cells[rows, cols] = 255
    Image.fromarray(np.kron(cells, np.ones((scale, scale), dtype=np.uint8))).save(path)
    return torch.from_numpy(cells > 0)


# ---------------------------------------------------------------- parsing
def test_parse_region_mask_and_box():
    assert parse_region("2:masks/road.png") == RegionSpec("2", mask=Path("masks/road.png"))
    assert parse_region("road:C:/m.png") == RegionSpec("road", mask=Path("C:/m.png"))  # split at the first colon
    assert parse_region(" car : 1, 2,5 ,6") == RegionSpec("car", box=(1, 2, 5, 6))
    for bad in ("2", ":m.png", "2:", "2:  "):
        with pytest.raises(ConvlensError, match="CLASS:MASK.png"):
            parse_region(bad)


def test_parse_grid():
    assert parse_grid("14x14") == (14, 14) and parse_grid("4×16") == (4, 16) and parse_grid(" 2X3 ") == (2, 3)
    for bad in ("14", "0x4", "ax4", "4x4x4", "-1x4"):
        with pytest.raises(ConvlensError, match="HxW"):
            parse_grid(bad)


def test_box_mask_is_x0_to_x1_and_y0_to_y1_excluded():
    mask = box_mask((1, 2, 4, 5), (6, 8))
    expected = torch.zeros(6, 8, dtype=torch.bool)
    for y in (2, 3, 4):
        for x in (1, 2, 3):
            expected[y, x] = True
    assert torch.equal(mask, expected)
    assert box_mask((0, 0, 8, 6), (6, 8)).all()
    for box in ((0, 0, 9, 6), (0, 0, 8, 7), (-1, 0, 2, 2), (3, 0, 3, 2), (0, 4, 2, 2)):
        with pytest.raises(ConvlensError, match="outside"):
            box_mask(box, (6, 8))


def test_read_mask_resizes_by_nearest_neighbour_to_the_grid(tmp_path):
    expected = cell_mask_png(tmp_path / "m.png", slice(3, 9), slice(0, 5))
    assert torch.equal(read_mask(tmp_path / "m.png", (16, 16)), expected)
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[5, 7] = 1  # any nonzero value is in the region
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png", (16, 16)).nonzero().tolist() == [[5, 7]]


def test_profile_token_layout():
    assert token_layout_from(None) is None and token_layout_from(False) is None
    assert token_layout_from(True) == TokenLayout()
    assert token_layout_from({"drop_tokens": 1, "grid": [4, 16]}) == TokenLayout(1, (4, 16))
    assert TokenLayout(1, (4, 16)).options() == {"reshape": "tokens", "drop_tokens": 1, "grid": (4, 16)}
    for bad in ({"drop": 1}, {"grid": 4}, {"drop_tokens": -1}, {"grid": [4, 0]}, "yes"):
        with pytest.raises(ConvlensError):
            token_layout_from(bad)


def test_profiles_of_the_segmentation_and_token_models(tmp_path):
    seg = load_model(SEG)
    assert seg.profile.output_grid == (16, 16) and seg.class_names == ["0", "1", "2", "3"]
    x = seg.preprocess(Image.new("RGB", (32, 32), (90, 20, 200)))[None]
    with torch.no_grad():
        share = seg.model(x).softmax(1).mean((2, 3))
    assert torch.allclose(predict(seg, x), share) and torch.allclose(predict(seg, x).sum(1), torch.ones(1))
    assert load_model(VIT).profile.output_grid is None
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"explain_layer": "mixer", "explain_tokens": {"drop_tokens": 1}}))
    vit = load_model(VIT, profile=profile)
    assert vit.profile.explain_tokens == TokenLayout(1, None)
    assert "explain layer: mixer (tokens, 1 dropped)" in describe(vit)
    assert "classes: 0, 1, 2, 3 (segmentation: a 16×16 output grid)" in describe(seg)
    profile.write_text(json.dumps({"explain_tokens": True}))
    with pytest.raises(ConvlensError, match="needs 'explain_layer'"):
        load_model(VIT, profile=profile)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
def bad_cases(tmp_path, image):
    empty = tmp_path / "empty.png"
    Image.new("L", (16, 16)).save(empty)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    cell_mask_png(tmp_path / "ok.png", slice(0, 4), slice(0, 4))
    seg = [image, "--model", SEG, "--layer", "act2", "--methods", "gradcam"]
    vit = [image, "--model", VIT, "--methods", "gradcam"]
    return [
        (seg + ["--target-region", f"1:{tmp_path / 'missing.png'}"], "no such file"),
        (seg + ["--target-region", f"1:{corrupt}"], "not a readable image"),
        (seg + ["--target-region", f"1:{empty}"], "region is empty"),
        (seg + ["--target-region", f"4:{tmp_path / 'ok.png'}"], "out of range 0..3"),
        (seg + ["--target-region", "road:0,0,2,2"], "unknown class"),
        (seg + ["--target-region", "1:0,0,17,4"], "outside the model's 16×16 output grid"),
        (seg + ["--target-region", "1:5,5,5,9"], "empty or outside"),
        (seg + ["--target-region", "1"], "CLASS:MASK.png"),
        (seg, "segmentation output"),  # a class target (the predicted class) on a segmentation output
        (seg + ["--target", "1"], "segmentation output"),
        (seg + ["--target", "1", "--target-region", "1:0,0,2,2"], "not allowed with"),
        (seg[:-1] + ["scorecam", "--target-region", "1:0,0,2,2"], "scorecam needs a class target"),
        (vit + ["--target-region", "1:0,0,2,2"], "needs a segmentation model"),
        (vit + ["--layer", "embed", "--tokens"], "not tokens"),
        (vit + ["--layer", "mixer"], "add --tokens"),
        (vit + ["--tokens"], "name it with --layer"),
        (vit + ["--layer", "mixer", "--tokens"], "65 tokens"),  # the class token not dropped: 65 is no square
        (vit + ["--layer", "mixer", "--tokens", "--drop-tokens", "1", "--grid", "5x5"], "--grid 5x5 does not hold"),
        (vit + ["--layer", "mixer", "--tokens", "--grid", "8by8"], "HxW"),
        (vit + ["--layer", "mixer", "--drop-tokens", "1"], "only with --tokens"),
        (vit[:-1] + ["saliency", "--layer", "mixer", "--tokens", "--drop-tokens", "1"], "read a layer"),
        (vit[:-1] + ["ablationcam", "--layer", "mixer", "--tokens", "--drop-tokens", "1"], "ablationcam cannot read a token layer"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, image):
    for k, (args, fragment) in enumerate(bad_cases(tmp_path, image)):
        out = tmp_path / f"out{k}"
        result = run(capsys, "explain", *args, "--out", out, "--quiet")
        assert_clean_error(result, fragment)
        assert not out.exists(), args


@pytest.mark.parametrize("command", ["evaluate", "stats"])
def test_commands_that_need_class_scores_refuse_a_segmentation_model(capsys, tmp_path, command):
    result = run(capsys, command, "--model", SEG, "--out", tmp_path / "o", "--quiet")
    assert_clean_error(result, "segmentation output")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the maps written = the API's
def api_maps(model, x, target, methods, layer=None, **layer_options) -> dict:
    """raw and map of each method through the API, with the options the command line uses."""
    out = {}
    for name in methods:
        reads_layer = method_info(name).needs_layer
        method = make_method(name, model, layer=layer if reads_layer else None,
                             **method_info(name).fast_options, **(layer_options if reads_layer else {}))
        res = method.attribute(x, target)
        out[f"{name}_raw"], out[f"{name}_map"] = res.raw.detach().numpy(), res.maps.detach().numpy()
    return out


def assert_written_equal(folder: Path, expected: dict):
    written = np.load(folder / "maps.npz")
    for key, value in expected.items():
        assert np.abs(value).max() > 0, key
        np.testing.assert_allclose(written[key], value, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_region_targets_on_the_command_line_write_the_apis_maps(tmp_path, image):
    methods = ["gradcam", "saliency", "occlusion"]
    mask = cell_mask_png(tmp_path / "mask.png", slice(2, 10), slice(4, 12))
    loaded = load_model(SEG)
    x = loaded.preprocess(Image.open(image))[None]
    for name, region, grid_mask in (("mask", f"2:{tmp_path / 'mask.png'}", mask),
                                    ("box", "1:3,0,9,5", box_mask((3, 0, 9, 5), (16, 16)))):
        proc = run_cli("explain", image, "--model", SEG, "--layer", "act2", "--methods", ",".join(methods),
                       "--target-region", region, "--out", tmp_path / name, "--quiet")
        assert proc.returncode == 0, proc.stderr
        cls = int(region.split(":")[0])
        assert_written_equal(tmp_path / name, api_maps(loaded.model, x, region_target(cls, grid_mask), methods,
                                                       layer="act2"))
        row = json.loads((tmp_path / name / "predictions.json").read_text())["predictions"][0]
        with torch.no_grad():  # a segmentation model's row: each class's mean probability over the grid
            share = loaded.model(x).softmax(1).mean((2, 3))[0]
        assert row["class_index"] == int(share.argmax()) and abs(row["probability"] - float(share.max())) < 1e-5


@pytest.mark.slow
def test_token_layers_on_the_command_line_write_the_apis_maps(tmp_path, image):
    methods = ["gradcam", "layercam", "saliency"]
    loaded = load_model(VIT)
    x = loaded.preprocess(Image.open(image))[None]
    expected = api_maps(loaded.model, x, 3, methods, layer="mixer", reshape="tokens", drop_tokens=1, grid=(4, 16))
    proc = run_cli("explain", image, "--model", VIT, "--layer", "mixer", "--tokens", "--drop-tokens", "1",
                   "--grid", "4x16", "--methods", ",".join(methods), "--target", "3", "--out", tmp_path / "flags",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_written_equal(tmp_path / "flags", expected)
    profile = tmp_path / "vit.json"
    profile.write_text(json.dumps({"explain_layer": "mixer", "explain_tokens": {"drop_tokens": 1, "grid": [4, 16]}}))
    proc = run_cli("explain", image, "--model", VIT, "--profile", profile, "--methods", ",".join(methods),
                   "--target", "3", "--out", tmp_path / "profile", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_written_equal(tmp_path / "profile", expected)
    assert json.loads((tmp_path / "profile" / "predictions.json").read_text())["layers"]["gradcam"] == "mixer"


@pytest.mark.slow
@pytest.mark.parametrize("model, args, left_out", [
    (SEG, ["--layer", "act2", "--target-region", "1:2,2,10,10"], {"cam", "scorecam"}),
    (VIT, ["--layer", "mixer", "--tokens", "--drop-tokens", "1"], {"cam", "ablationcam"}),
])
def test_all_methods_run_on_a_segmentation_and_a_token_model(tmp_path, image, model, args, left_out):
    """Left out: CAM and Score-CAM need a class target; CAM's head check reads the token layer unreshaped,
    Ablation-CAM rewrites the layer output itself."""
    from convlens.attribution import METHODS

    proc = run_cli("explain", image, "--model", model, *args, "--methods", "all", "--out", tmp_path / "o", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["methods"] == [m for m in METHODS if m not in left_out]
    maps = np.load(tmp_path / "o" / "maps.npz")
    for name in summary["methods"]:
        assert np.isfinite(maps[f"{name}_map"]).all() and np.abs(maps[f"{name}_map"]).sum() > 0, name
