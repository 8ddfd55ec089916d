import numpy as np
import pytest
from PIL import Image

from convlens.data.images import (expand_image_paths, imagenet_deprocess, imagenet_preprocess, mnist_preprocess,
                                  open_image)
from convlens.errors import ConvlensError


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = (np.arange(32 * 48) % 251).reshape(32, 48)
    if mode == "I;16":
        img = Image.fromarray((arr * 200).astype(np.uint16))
        assert img.mode.startswith("I;16")
    else:
        img = Image.fromarray(arr.astype(np.uint8))
    if mode not in ("L", "I;16"):
        img = img.convert(mode)
    path = tmp_path / f"x.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (48, 32)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90°
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_corrupt_file_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ConvlensError, match="broken.png"):
        open_image(bad)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import convlens.data.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ConvlensError, match="too large"):
        open_image(tmp_path / "big.png")


def test_imagenet_preprocess_roundtrip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    x = imagenet_preprocess(img)
    assert x.shape == (3, 224, 224)
    assert float(x.min()) >= -127 / 128 - 1e-6 and float(x.max()) <= 1.0 + 1e-6
    back = imagenet_deprocess(x)
    assert back.shape == (224, 224, 3) and 0 <= back.min() and back.max() <= 1


def test_mnist_preprocess_inverts_dark_on_light():
    img = Image.new("L", (56, 56), 255)
    x = mnist_preprocess(img)
    assert x.shape == (1, 28, 28) and float(x.max()) == 0.0


def test_expand_folder(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in expand_image_paths([tmp_path])] == ["a.png"]
    with pytest.raises(ConvlensError):
        expand_image_paths([tmp_path / "missing.png"])
