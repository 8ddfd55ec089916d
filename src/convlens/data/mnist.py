"""The MNIST files shipped in the package: IDX parsing with checksum verification.

Files are looked up in a folder (the package's own copy by default). When one is
missing, it may be downloaded from a mirror into a cache folder; every file is
verified by SHA-256 before use and downloads are written atomically.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import ConvlensError
from ..io import write_bytes

MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IDX_MAGIC = {1: 2049, 3: 2051}  # ndim -> magic number of unsigned-byte IDX files


@dataclass
class MnistSplit:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] with a channel axis, and long labels."""
        x = torch.from_numpy(self.images.copy()).unsqueeze(1).float().div_(255.0)
        return x, torch.from_numpy(self.labels.copy())


def package_mnist_dir() -> Path:
    return Path(str(resources.files("convlens.data") / "files" / "mnist"))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convlens" / "mnist"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, name: str) -> None:
    actual = sha256_of(path)
    if actual != MNIST_FILES[name]:
        raise ConvlensError(f"MNIST file {path} has SHA-256 {actual[:12]}…, expected {MNIST_FILES[name][:12]}…")


def download_file(name: str, mirror: str, dest_dir: Path, timeout: float = 60.0) -> Path:
    """Download ``name`` from ``mirror`` into ``dest_dir``; verify before the atomic rename."""
    url = mirror.rstrip("/") + "/" + name
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ConvlensError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    actual = hashlib.sha256(payload).hexdigest()
    if actual != MNIST_FILES[name]:
        raise ConvlensError(f"download of {url} is corrupted (SHA-256 {actual[:12]}…, expected {MNIST_FILES[name][:12]}…)")
    return write_bytes(dest_dir / name, payload)


def locate_file(name: str, root: Path | None, mirror: str | None, cache_dir: Path | None) -> Path:
    """Find a verified copy of ``name``: in ``root`` (or the package), else the cache, else download."""
    candidates = [root if root is not None else package_mnist_dir()]
    cache = cache_dir or default_cache_dir()
    candidates.append(cache)
    for folder in candidates:
        path = folder / name
        if path.is_file():
            verify_file(path, name)
            return path
    if mirror is None:
        raise ConvlensError(f"MNIST file {name} not found in {candidates[0]} and no mirror given")
    return download_file(name, mirror, cache)


def parse_idx(raw: bytes, ndim: int, source: str) -> np.ndarray:
    """Parse an unsigned-byte IDX payload with ``ndim`` dimensions."""
    if len(raw) < 4 + 4 * ndim:
        raise ConvlensError(f"{source}: truncated IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise ConvlensError(f"{source}: IDX magic {magic}, expected {IDX_MAGIC[ndim]}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConvlensError(f"{source}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def read_idx_gz(path: Path, ndim: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise ConvlensError(f"cannot decompress {path}: {exc}") from None
    return parse_idx(raw, ndim, str(path))


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, mirror: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> MnistSplit:
    """Load a verified MNIST split ("train" or "test")."""
    if split not in SPLIT_PREFIX:
        raise ConvlensError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    mirror = mirror or os.environ.get("CONVLENS_MNIST_MIRROR")
    prefix = SPLIT_PREFIX[split]
    root_p = Path(root) if root is not None else None
    cache_p = Path(cache_dir) if cache_dir is not None else None
    img_path = locate_file(f"{prefix}-images-idx3-ubyte.gz", root_p, mirror, cache_p)
    lbl_path = locate_file(f"{prefix}-labels-idx1-ubyte.gz", root_p, mirror, cache_p)
    images = read_idx_gz(img_path, 3)
    labels = read_idx_gz(lbl_path, 1).astype(np.int64)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ConvlensError(f"MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return MnistSplit(images=images, labels=labels)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded split of ``range(n)`` into training and validation indices."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])
