import gzip
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest

from convlens.data.mnist import MNIST_FILES, load_mnist, package_mnist_dir, parse_idx
from convlens.errors import ConvlensError


def test_shipped_mnist_loads_with_expected_shapes():
    test = load_mnist("test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert test.labels.shape == (10000,)
    assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = test.tensors()
    assert x.shape == (10000, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    for name in MNIST_FILES:
        shutil.copy(package_mnist_dir() / name, tmp_path / name)
    data = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(ConvlensError, match="SHA-256"):
        load_mnist("test", root=tmp_path, cache_dir=tmp_path / "cache")


def test_idx_parser_checks_magic_and_size():
    header = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert parse_idx(header + bytes([1, 2, 3]), 1, "x").tolist() == [1, 2, 3]
    with pytest.raises(ConvlensError, match="magic"):
        parse_idx((2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3), 1, "x")
    with pytest.raises(ConvlensError, match="values for shape"):
        parse_idx(header + bytes(2), 1, "x")


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_missing_files_download_from_mirror_and_verify(tmp_path, http_dir):
    served, url = http_dir
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(package_mnist_dir() / name, served / name)
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    split = load_mnist("test", root=empty, mirror=url, cache_dir=cache)
    assert split.images.shape == (10000, 28, 28)
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_corrupted_download_leaves_nothing_behind(tmp_path, http_dir):
    served, url = http_dir
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    shutil.copy(package_mnist_dir() / "t10k-images-idx3-ubyte.gz", served / "t10k-images-idx3-ubyte.gz")
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    with pytest.raises(ConvlensError, match="corrupted"):
        load_mnist("test", root=empty, mirror=url, cache_dir=cache)
    assert not any(p.name.startswith("t10k-labels") or p.name.endswith(".tmp") for p in cache.iterdir())


def test_unreachable_mirror_is_a_clear_error(tmp_path):
    with pytest.raises(ConvlensError, match="cannot download"):
        load_mnist("test", root=tmp_path, mirror="http://127.0.0.1:9/", cache_dir=tmp_path / "c")
