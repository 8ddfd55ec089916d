"""`convlens report` on a user model, and `stats --data` memory over a folder.

    python bench/report.py [--threads 2] [--images 60]
        report time against the bare forwards it needs (ratio printed)
    python bench/report.py --rss [--threads 1]
        peak RSS of `convlens stats --data` over 1,000 and 10,000 images (target: flat)

The user model is tests/user_models/tinyres.py (a ResNet-style CNN with BatchNorm, random weights);
the folder holds synthetic 64×64 images of three classes (PNG files written by this script).
"""
from __future__ import annotations

import argparse
import json

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
FACTORY = f"{ROOT / 'tests' / 'user_models' / 'tinyres.py'}:build"
CLASSES = ["circle", "square", "stripes"]


def make_folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.random((64, 64, 3)) * 80).astype(np.uint8)
            if c == 0:
                a[((yy - 32) ** 2 + (xx - 32) ** 2) < 200] = 255
            elif c == 1:
                a[16:48, 16:48] = 255
            else:
                a[:, ::6] = 255
            Image.fromarray(a).save(root / name / f"{i:05d}.png", compress_level=1)
    return root


def write_user_files(root: Path) -> tuple[Path, Path]:
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "user_models"))
    import tinyres

    torch.manual_seed(0)
    torch.save(tinyres.build().state_dict(), root / "w.pt")
    (root / "profile.json").write_text(json.dumps({"input_size": [64, 64], "resize": "stretch",
                                                   "class_names": CLASSES}))
    return root / "w.pt", root / "profile.json"


def cli(*args: str, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convlens", *args, "--quiet", "--threads", str(threads)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def bare_forwards(weights: Path, profile: Path, folder: Path, threads: int) -> float:
    """Reading and preprocessing every image and one forward of each: the least a report must do."""
    import torch

    from convlens.data.folders import scan_labelled_folder, stream_batches
    from convlens.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(FACTORY, weights=str(weights), profile=str(profile))
    scanned, _ = scan_labelled_folder(folder, loaded.class_names)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _, _ in stream_batches(scanned.items, loaded.preprocess, "RGB", 64):
            loaded.model(x)
    return time.perf_counter() - start


def peak_rss_mb(args: list[str]) -> float:
    code = ("import resource, sys; from convlens.cli import main; main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=60, help="images per class for the report run")
    ap.add_argument("--rss", action="store_true", help="measure stats --data memory at 1,000 and 10,000 images")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights, profile = write_user_files(tmp)
        common = ["--model", FACTORY, "--weights", str(weights), "--profile", str(profile)]
        if a.rss:
            for per_class in (334, 3334):
                folder = make_folder(tmp / f"data{per_class}", per_class)
                mb = peak_rss_mb(["stats", *common, "--data", str(folder), "--out", str(tmp / f"s{per_class}"),
                                  "--quiet", "--threads", str(a.threads)])
                print(f"stats --data over {3 * per_class:,} images: peak RSS {mb:.0f} MB")
            return
        folder = make_folder(tmp / "data", a.images)
        forwards = bare_forwards(weights, profile, folder, a.threads)
        report = cli("report", *common, "--data", str(folder), "--out", str(tmp / "report"), threads=a.threads)
        print(f"{3 * a.images} images: bare forwards {forwards:.2f} s, report {report:.1f} s, "
              f"ratio {report / forwards:.0f}× (the report adds statistics, activation maximization, "
              "explanations and faithfulness on top of one pass)")


if __name__ == "__main__":
    main()
