"""`convlens serve` without a browser: the page's computations (convlens.serve.logic) and the app's guards."""
import io
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from convlens.attribution import METHODS, make_method
from convlens.errors import ConvlensError
from convlens.hooks import count_hooks
from convlens.serve import logic

CANVAS = 280


def sketch(strokes, width=16, transparent=False, size=CANVAS) -> np.ndarray:
    """A drawing as the page's sketchpad sends it: RGBA uint8, black strokes on white (or transparent)."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0) if transparent else (255, 255, 255, 255))
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        draw.line(stroke, fill=(0, 0, 0, 255), width=width, joint="curve")
    return np.asarray(img)


def ink_box(image: np.ndarray, threshold: float = 0.0) -> tuple[int, int]:
    rows = np.flatnonzero((image > threshold).any(1))
    cols = np.flatnonzero((image > threshold).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.fixture(scope="module")
def draw(lab_model, mnist_test):
    x, y = mnist_test
    return logic.draw_session(lab_model, data=(x[:2000], y[:2000]))


# ------------------------------------------------------------------ drawing → MNIST input
def test_ink_is_inverted_luminance_over_white():
    opaque = sketch([[(100, 40), (100, 240)]])
    transparent = sketch([[(100, 40), (100, 240)]], transparent=True)
    for drawing in (opaque, transparent):
        ink = logic.ink_from_drawing(drawing)
        assert ink.shape == (CANVAS, CANVAS)
        assert ink[140, 100] == 1.0 and ink[140, 200] == 0.0
    np.testing.assert_array_equal(logic.ink_from_drawing(opaque), logic.ink_from_drawing(transparent))
    grey = np.full((4, 4, 4), [128, 128, 128, 255], dtype=np.uint8)
    assert logic.ink_from_drawing(grey)[0, 0] == pytest.approx(1 - 128 / 255)
    half_transparent_black = np.full((4, 4, 4), [0, 0, 0, 102], dtype=np.uint8)  # 40 % black over white
    assert logic.ink_from_drawing(half_transparent_black)[0, 0] == pytest.approx(0.4, abs=1 / 255)


@pytest.mark.parametrize("strokes", [
    [[(60, 30), (60, 250)]],                                            # a "1" near the left edge
    [[(30, 30), (30, 200), (110, 200)]],                                # an L: mass off the box centre
    [[(150, 150), (270, 150)], [(210, 150), (210, 270)]],               # a T in the bottom-right corner
])
def test_drawing_becomes_mnist_box_with_centre_of_mass_centred(strokes):
    image = logic.mnist_from_ink(logic.ink_from_drawing(sketch(strokes)))
    assert image.shape == (28, 28) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert max(ink_box(image)) == 20  # longer side scaled to the 20×20 box
    row, col = logic.centre_of_mass(image)
    assert abs(row - 13.5) <= 0.5 and abs(col - 13.5) <= 0.5


def test_centring_uses_centre_of_mass_not_box_centre():
    image = logic.mnist_from_ink(logic.ink_from_drawing(sketch([[(30, 30), (30, 200), (110, 200)]], width=20)))
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    box_centre_col = (cols[0] + cols[-1]) / 2
    assert box_centre_col - 13.5 > 1.0  # the L's mass is on its left: its box sits right of centre
    assert abs(logic.centre_of_mass(image)[1] - 13.5) <= 0.5


def test_aspect_ratio_kept_and_position_and_scale_do_not_matter():
    bar = logic.mnist_from_ink(logic.ink_from_drawing(sketch([[(140, 40), (140, 240)]], width=20)))
    h, w = ink_box(bar)
    assert h == 20 and w <= 4  # a thin bar stays thin: 220×20 px → 20×2
    moved = logic.mnist_from_ink(logic.ink_from_drawing(sketch([[(60, 20), (60, 220)]], width=20)))
    np.testing.assert_allclose(bar, moved, atol=1e-6)  # translation: identical
    big = logic.mnist_from_ink(logic.ink_from_drawing(sketch([[(280, 80), (280, 480)]], width=40, size=560)))
    assert np.abs(big - bar).max() < 0.15  # twice the size: the same digit up to resampling


def test_empty_canvas_gives_nothing(draw):
    blank = sketch([])
    assert logic.mnist_from_ink(logic.ink_from_drawing(blank)) is None
    assert logic.draw_update(draw, blank) is None
    assert logic.draw_update(draw, None) is None


def test_mnist_digits_drawn_again_are_read_as_before(lab_model, mnist_test):
    """Real MNIST digits, enlarged 10× and shifted as a drawing, then normalized again: the network's
    answers stay the same (the transform reproduces MNIST's own normalization)."""
    x, _ = mnist_test
    digits = x[:200, 0].numpy()
    again = []
    for k, d in enumerate(digits):
        canvas = np.zeros((CANVAS + 40, CANVAS + 40), dtype=np.float32)
        big = d.repeat(10, 0).repeat(10, 1)
        canvas[k % 40:k % 40 + CANVAS, (3 * k) % 40:(3 * k) % 40 + CANVAS] = big
        drawing = ((1.0 - canvas) * 255).astype(np.uint8)  # dark ink on white paper
        again.append(logic.mnist_from_ink(logic.ink_from_drawing(drawing)))
    with torch.no_grad():
        before = lab_model.model(x[:200]).argmax(1)
        after = lab_model.model(torch.from_numpy(np.stack(again))[:, None]).argmax(1)
    assert float((before == after).float().mean()) >= 0.95


# ------------------------------------------------------------------ pictures
def test_colormap_table_matches_matplotlib():
    import matplotlib

    values = np.linspace(0, 1, 1001)
    for name in ("viridis", "jet", "jet_r"):
        np.testing.assert_allclose(logic.colormap(values, name), matplotlib.colormaps[name](values)[:, :3],
                                   atol=0.02)
    assert tuple(logic.colormap(np.array([np.nan]), bad=(1.0, 0.0, 0.5))[0]) == (1.0, 0.0, 0.5)


def test_feature_map_mosaic_places_tiles_on_one_scale():
    acts = np.zeros((3, 4, 4))
    acts[1, 0, 0] = 2.0  # the peak: filter 1, top-left pixel
    acts[2, 3, 3] = 1.0
    picture = logic.feature_map_mosaic(acts, cols=2)  # 2 rows × 2 cols of 4×4 tiles, 1-px gaps
    assert picture.shape == (9, 9, 3)
    table = (logic.colour_table("viridis") * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(picture[0, 5], table[255])   # filter 1 peak → top of the scale
    np.testing.assert_array_equal(picture[8, 3], table[128])   # filter 2 at half the peak
    np.testing.assert_array_equal(picture[0, 0], table[0])
    np.testing.assert_array_equal(picture[5, 5], [255, 255, 255])  # empty fourth slot


def test_live_rank_map_reads_the_statistics():
    mean_map = np.zeros((2, 3, 2, 2))
    mean_map[0, 0] = 4.0
    mean_map[1, 1] = 2.0
    mean_map[0, 2] = 1.0  # peaks P = (4, 2, 1)
    stat = {"mean_map": mean_map, "rank": np.array([[3, 1, 2], [1, 2, 3]])}
    acts = np.array([[[4.0, 0.0], [0.2, 0.0]],     # A0 / 4
                     [[1.0, 1.0], [0.0, 0.0]],     # A1 / 2
                     [[0.0, 0.9], [0.0, 0.05]]])   # A2 / 1
    rank = logic.live_rank_map(acts, stat, cls=0, threshold=0.1)
    # winners: (0,0) f0 (1.0), (0,1) f2 (0.9 > 0.5), (1,0) f0 (0.05 < 0.1 → none), (1,1) f2 (0.05 → none)
    np.testing.assert_array_equal(rank, np.array([[3.0, 2.0], [np.nan, np.nan]]))
    np.testing.assert_array_equal(logic.live_rank_map(acts, stat, cls=1, threshold=0.1)[0], [1.0, 3.0])


# ------------------------------------------------------------------ the Draw tab
def test_draw_update_values(draw, lab_model):
    drawing = sketch([[(140, 40), (140, 240)]])
    result = logic.draw_update(draw, drawing, ["gradcam", "saliency"])
    x = torch.from_numpy(result.image28)[None, None]
    with torch.no_grad():
        probs = lab_model.model(x).softmax(1)[0]
    assert result.predicted == int(probs.argmax())
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    for name, p in zip(lab_model.class_names, probs):
        assert result.probabilities[name] == pytest.approx(float(p), abs=1e-6)
    cam = make_method("gradcam", lab_model.model, layer="l3").attribute(x, result.predicted)
    expected = logic.map_overlay(result.image28, cam.normalized[0].numpy())
    np.testing.assert_array_equal(result.method_maps["gradcam"], expected)
    assert set(result.method_maps) == {"gradcam", "saliency"} and result.errors == {}
    assert list(result.feature_maps) == ["l1", "l2", "l3"]
    assert result.feature_maps["l1"].shape == (28, 28 * 9 + 8, 3)  # 9 filters in a row, 1-px gaps
    assert result.rank_overlays["l2"].shape == (28, 28, 3)
    assert count_hooks(lab_model.model) == 0


def test_failing_method_is_reported_and_the_others_still_run(draw, monkeypatch):
    from convlens.attribution.base import Method

    class Broken(Method):
        name = "broken"

        def attribute(self, x, target=None):
            raise RuntimeError("deliberately broken\nsecond line")

    monkeypatch.setitem(METHODS, "broken", Broken)
    result = logic.draw_update(draw, sketch([[(140, 40), (140, 240)]]), ["broken", "cam", "gradcam"])
    assert result.errors["broken"] == "RuntimeError: deliberately broken"
    assert result.errors["cam"].startswith("ConvlensError: CAM needs a global-average-pooling")  # no GAP head
    assert list(result.method_maps) == ["gradcam"]
    assert logic.draw_update(draw, sketch([[(140, 40), (140, 240)]]), ["gradcam"]).errors == {}  # still serving
    with pytest.raises(ConvlensError, match="unknown method"):
        logic.draw_update(draw, sketch([[(140, 40), (140, 240)]]), ["no-such-method"])


def test_concurrent_requests_do_not_mix(draw, lab_model):
    drawings = [sketch([[(140, 40), (140, 240)]]), sketch([[(80, 60), (200, 60), (200, 230)]])]
    expected = [logic.draw_update(draw, d) for d in drawings]
    results: dict[int, list] = {0: [], 1: []}

    def worker(i):
        for _ in range(6):
            results[i].append(logic.draw_update(draw, drawings[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for r in results[i]:
            assert r.probabilities == expected[i].probabilities
            for name in r.method_maps:
                np.testing.assert_array_equal(r.method_maps[name], expected[i].method_maps[name])
    assert expected[0].probabilities != expected[1].probabilities  # mixing would show
    assert count_hooks(lab_model.model) == 0


# ------------------------------------------------------------------ the Statistics tab
def test_stats_view_is_ordered_by_rank(draw):
    stat = draw.stats["l2"]
    picture, rows = logic.stats_view(draw, "l2", 3)
    assert [r[0] for r in rows] == list(range(1, 10))
    assert rows[0][1] == int(np.argmax(stat["score"][3]))
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert rows[0][2] == pytest.approx(float(stat["score"][3].max()), abs=1e-4)
    assert picture.ndim == 3 and picture.shape[2] == 3
    with pytest.raises(ConvlensError, match="layer"):
        logic.stats_view(draw, "l9", 0)
    with pytest.raises(ConvlensError, match="out of range"):
        logic.stats_view(draw, "l1", 10)


def test_draw_tab_needs_a_one_channel_model(lite0):
    with pytest.raises(ConvlensError, match="1-channel"):
        logic.draw_session(lite0, data=(torch.zeros(1, 3, 224, 224), torch.zeros(1, dtype=torch.long)))


# ------------------------------------------------------------------ activation maximization
def test_actmax_cache_computes_the_class_sweep_once(draw, lab_model):
    cache = logic.ActMaxCache(steps=15)
    image3, p3, cached = cache.image(draw, "class", 3, 0, 4.0)
    assert not cached and image3.shape == (28, 28)
    assert len(cache.images) == 10  # all classes at this tv weight in one batch
    with torch.no_grad():
        probs = lab_model.model(torch.from_numpy(image3)[None, None].float()).softmax(1)[0]
    assert p3 == pytest.approx(float(probs[3]), abs=1e-4)
    again, p_again, cached = cache.image(draw, "class", 3, 0, 4.0)
    assert cached and p_again == p3 and again is image3
    _, _, cached7 = cache.image(draw, "class", 7, 0, 4.0)
    assert cached7
    _, _, cached_other_tv = cache.image(draw, "class", 3, 0, 2.0)
    assert not cached_other_tv
    _, p_pair, _ = cache.image(draw, "pair", 1, 7, 4.0)
    assert 0.0 <= p_pair <= 1.0 + 1e-6
    image_ch, _, _ = cache.image(draw, "channel", 2, 0, 4.0, layer="l2")
    assert image_ch.shape == (28, 28)
    for bad in [("class", 10, 0, 4.0, None), ("pair", 1, 1, 4.0, None), ("channel", 99, 0, 4.0, "l2"),
                ("channel", 0, 0, 4.0, "l9"), ("class", 1, 0, -1.0, None), ("nope", 1, 0, 1.0, None)]:
        with pytest.raises(ConvlensError):
            cache.image(draw, *bad[:4], layer=bad[4])
    assert count_hooks(lab_model.model) == 0


# ------------------------------------------------------------------ uploads and photos
def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height 1-bit pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_upload_limits(tmp_path):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(100_000, 100_000))
    assert bomb.stat().st_size < 2000
    with pytest.raises(ConvlensError, match="image too large: 100000×100000.*refused without decoding"):
        logic.read_upload(bomb, "RGB")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's own limit restored
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(ConvlensError, match="upload too large"):
        logic.read_upload(big, "RGB", max_bytes=1000)
    with pytest.raises(ConvlensError, match="not a readable image"):
        logic.read_upload(big, "RGB")
    ok = tmp_path / "ok.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(ok)
    img = logic.read_upload(ok, "L", max_pixels=600)
    assert img.size == (30, 20) and img.mode == "L"
    with pytest.raises(ConvlensError, match="image too large"):
        logic.read_upload(ok, "L", max_pixels=599)


def test_page_picks_shipped_photos_by_name_only(lite0, tmp_path):
    session = logic.Session(lite0)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    for name in (str(secret), "../photos/chelsea.png", "/etc/passwd", None):
        with pytest.raises(ConvlensError, match="no shipped photo named"):
            logic.photo_input(name, None, session, logic.MAX_UPLOAD_BYTES, logic.MAX_UPLOAD_PIXELS)
    assert logic.photo_input("chelsea.png", None, session, logic.MAX_UPLOAD_BYTES, logic.MAX_UPLOAD_PIXELS).size \
        == Image.open(logic.shipped_photos()["chelsea.png"]).size


def test_photo_top5_and_maps(lite0):
    session = logic.Session(lite0)
    image = logic.photo_input("chelsea.png", None, session, logic.MAX_UPLOAD_BYTES, logic.MAX_UPLOAD_PIXELS)
    state = logic.photo_predict(session, image)
    assert len(state.top) == 5
    assert [p for _, _, p in state.top] == sorted((p for _, _, p in state.top), reverse=True)
    cats = {"tabby", "tiger cat", "Egyptian cat"}
    assert cats & {name for _, name, _ in state.top}
    second = state.top[1][0]
    explanation = logic.photo_explain(session, state, second, ["gradcam", "guided-gradcam"])
    expected = make_method("gradcam", lite0.model).attribute(state.x, second)
    np.testing.assert_allclose(explanation.raw["gradcam"], expected.raw[0].numpy(), rtol=1e-5, atol=1e-7)
    assert explanation.overlays["gradcam"].shape == (224, 224, 3) and explanation.target == second
    with np.load(io.BytesIO(logic.maps_npz_bytes(explanation, lite0.class_names[second]))) as npz:
        assert int(npz["target"]) == second and str(npz["target_name"]) == lite0.class_names[second]
        np.testing.assert_array_equal(npz["guided-gradcam_raw"], explanation.raw["guided-gradcam"])
        np.testing.assert_array_equal(npz["gradcam_map"], explanation.maps["gradcam"])
    with pytest.raises(ConvlensError, match="out of range"):
        logic.photo_explain(session, state, 1000, ["gradcam"])
    assert count_hooks(lite0.model) == 0


# ------------------------------------------------------------------ the app's guards (Gradio not needed)
def test_missing_gradio_is_one_clear_line(monkeypatch):
    from convlens.serve import app

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    with pytest.raises(ConvlensError, match=r"pip install 'convlens\[serve\]'"):
        app.require_gradio()


def test_loopback_detection():
    from convlens.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--model", "no/such/run"], "no such run folder"),
    (["--port", "70000"], "--port must be 1..65535"),
    (["--max-upload-mb", "0"], "upload limits must be positive"),
])
def test_serve_cli_errors_are_one_line(args, fragment):
    from conftest import assert_clean_error, run_cli

    try:
        import gradio  # noqa: F401
    except ImportError:
        fragment = "pip install 'convlens[serve]'"  # without the extra, that is the one line
    assert_clean_error(run_cli("serve", *args), fragment)  # every check comes before anything binds a port
