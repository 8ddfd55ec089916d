"""Issue 13: every bad input and every fault ends in one clear line (exit 2), nothing partial left behind.

Most cases run the CLI in-process (``convlens.cli.main``) on an untrained lab network saved as a
checkpoint, so they take milliseconds; the few that need a real process are marked slow.
"""
import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error
from convlens import cli
from convlens.errors import ConvlensError


# ---------------------------------------------------------------- helpers
class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body blocks, e.g. in open() of a FIFO."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(capsys, *args) -> Result:
    """``convlens ARGS`` in-process; returns exit code, stdout, stderr."""
    capsys.readouterr()
    with deadline(60):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def digit_png(path, seed=0):
    arr = (np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An untrained (seeded) lab network saved as a run folder, as training writes it."""
    from convlens.io import save_torch
    from convlens.models.labnet import LabNet
    from convlens.training import checkpoint_dict

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    save_torch(folder / "model.pt", checkpoint_dict(LabNet(), {"seed": 0}))
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return [digit_png(folder / f"d{i}.png", i) for i in range(3)]


FAST = ["--methods", "gradcam,saliency", "--quiet"]


# ---------------------------------------------------------------- 1. special files
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_a_named_pipe_anywhere_is_refused_without_blocking(capsys, tmp_path, run_dir, fifo, images):
    out = tmp_path / "out"
    cases = [("explain", fifo, "--model", run_dir, "--out", out, *FAST),
             ("predict", fifo, "--model", run_dir),
             ("explain", images[0], "--model", fifo, "--out", out, *FAST),
             ("featuremaps", "--model", run_dir, "--image", fifo, "--out", out),
             ("stats", "--model", run_dir, "--data", fifo, "--out", out),
             ("explain", "/dev/null", "--model", run_dir, "--out", out, *FAST)]
    for args in cases:
        res = run(capsys, *args)
        kind = "character device" if "/dev/null" in args else "named pipe"
        assert_clean_error(res, kind)
        assert not out.exists(), args


# ---------------------------------------------------------------- 2. the output side
def test_output_folder_checked_before_any_work(capsys, tmp_path, run_dir, images):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_clean_error(run(capsys, "explain", images[0], "--model", run_dir, "--out", a_file, *FAST), "not a folder")
    # --out is the input folder: a second run would explain its own figures
    folder = images[0].parent
    assert_clean_error(run(capsys, "explain", folder, "--model", run_dir, "--out", folder, *FAST), "input folder")
    assert listing(folder) == ["d0.png", "d1.png", "d2.png"]
    # a bad input leaves no empty --out behind
    out = tmp_path / "new" / "out"
    assert_clean_error(run(capsys, "explain", tmp_path / "missing.png", "--model", run_dir, "--out", out, *FAST),
                       "no such file")
    assert not (tmp_path / "new").exists()


def test_a_folder_where_the_summary_goes_is_reported_before_the_figures(capsys, tmp_path, run_dir, images):
    out = tmp_path / "out"
    (out / "predictions.json").mkdir(parents=True)
    res = run(capsys, "explain", *images, "--model", run_dir, "--out", out, *FAST)
    assert_clean_error(res, "predictions.json: is a folder")
    assert listing(out) == ["predictions.json"]
    (tmp_path / "stats" / "stats.json").mkdir(parents=True)
    assert_clean_error(run(capsys, "stats", "--model", run_dir, "--out", tmp_path / "stats", "--limit", "10"),
                       "stats.json: is a folder")
    assert listing(tmp_path / "stats") == ["stats.json"]


def test_an_output_path_on_a_device_node_is_never_replaced(capsys, tmp_path, run_dir, images):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    res = run(capsys, "predict", images[0], "--model", run_dir, "--json", node)
    assert_clean_error(res, "character device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_outputs_follow_the_umask(capsys, tmp_path, run_dir, images):
    old = os.umask(0o002)
    try:
        res = run(capsys, "explain", images[0], "--model", run_dir, "--out", tmp_path / "out", *FAST)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(["d0_methods.png", "maps.npz", "predictions.json"], 0o664)


@pytest.mark.parametrize("fault", ["write", "inodes"])
def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path, run_dir, images, monkeypatch, fault):
    out = tmp_path / "out"
    calls = {"n": 0}
    if fault == "write":
        real = os.write

        def write(fd, data):
            calls["n"] += 1
            if calls["n"] > 2:  # the first figure lands, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)
        monkeypatch.setattr(os, "write", write)
    else:
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    res = run(capsys, "explain", *images, "--model", run_dir, "--out", out, *FAST)
    assert_clean_error(res, "no space left")
    assert calls["n"] > 2
    assert not out.exists()  # everything the command created is gone, temporaries included


def test_awkward_names_keep_distinct_valid_outputs(capsys, tmp_path, run_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = [digit_png(tmp_path / "a" / "x.png", 1), digit_png(tmp_path / "b" / "x.png", 2)]
    long_name = digit_png(tmp_path / ("n" * 240 + ".png"), 3)
    bad_utf8 = digit_png(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png"), 4)
    stale = tmp_path / "out" / ".convlens-999999999-abc.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a killed run")
    legacy = tmp_path / "out" / ".x_methods.k2j4_9az.png.tmp"  # an earlier version's temporary, two hours old
    legacy.write_bytes(b"")
    os.utime(legacy, (os.path.getmtime(legacy) - 7200,) * 2)
    recent = tmp_path / "out" / ".y.abcdefgh.json.tmp"  # maybe another process's write in progress: kept
    recent.write_bytes(b"")
    res = run(capsys, "explain", *same, long_name, bad_utf8, "--model", run_dir, "--out", tmp_path / "out", *FAST)
    assert res.returncode == 0, res.stderr
    names = listing(tmp_path / "out")
    assert not stale.exists() and not legacy.exists() and recent.exists()
    names.remove(recent.name)
    assert all(len(os.fsencode(n)) <= 255 for n in names)
    figures = [n for n in names if n.endswith("_methods.png")]
    assert len(figures) == 4 and "x_methods.png" in figures and "x-2_methods.png" in figures
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text("utf-8"))
    shown = [r["image"] for r in summary["predictions"]]
    assert len(set(shown)) == 4 and "caf\ufffd.png" in shown
    maps = np.load(tmp_path / "out" / "maps.npz")
    assert list(maps["images"]) == shown and maps["gradcam_map"].shape == (4, 28, 28)
    assert not np.array_equal(maps["saliency_raw"][0], maps["saliency_raw"][1])  # a/x and b/x both kept


@pytest.mark.slow
def test_a_closed_stdout_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "convlens", "summary"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    proc.stdout.close()  # the reader went away, like `| head -1`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert stderr == ""


# ---------------------------------------------------------------- 3. numbers that are not numbers
def test_nan_weights_and_flipped_bits_are_refused_at_load(capsys, tmp_path, run_dir, images):
    from convlens.io import save_torch
    from convlens.models.registry import load_checkpoint

    ckpt = load_checkpoint(run_dir / "model.pt")
    out = tmp_path / "out"
    # NaN weights (e.g. a diverged training), digest made over them: refused before any figure
    nan = {**ckpt, "state_dict": {k: v.clone() for k, v in ckpt["state_dict"].items()}}
    nan["state_dict"]["l1.conv.weight"][0, 0, 0, 0] = float("nan")
    from convlens.integrity import digest_record
    nan["digest"] = digest_record(nan["state_dict"])
    save_torch(tmp_path / "nan.pt", nan)
    assert_clean_error(run(capsys, "stats", "--model", tmp_path / "nan.pt", "--out", out, "--limit", "10"),
                       "l1.conv.weight holds NaN")
    assert not out.exists()
    # one flipped exponent bit in the stored bytes of a weight
    raw = bytearray((run_dir / "model.pt").read_bytes())
    weight = ckpt["state_dict"]["l2.conv.weight"].flatten()[:4].numpy().tobytes()
    at = raw.find(weight)
    assert at > 0 and raw.find(weight, at + 1) < 0
    raw[at + 3] ^= 0x40
    (tmp_path / "flipped.pt").write_bytes(bytes(raw))
    assert_clean_error(run(capsys, "explain", images[0], "--model", tmp_path / "flipped.pt", "--out", out, *FAST),
                       "damaged checkpoint")
    assert not out.exists()
    # a checkpoint written before digests existed still loads
    old = {k: v for k, v in ckpt.items() if k != "digest"}
    save_torch(tmp_path / "old.pt", old)
    assert run(capsys, "explain", images[0], "--model", tmp_path / "old.pt", "--out", out, *FAST).returncode == 0


def test_non_finite_pixels_and_lying_png_headers_are_refused(capsys, tmp_path, run_dir):
    arr = np.ones((28, 28), np.float32)
    arr[3, 4] = np.inf
    Image.fromarray(arr, "F").save(tmp_path / "inf.tif")
    out = tmp_path / "out"
    assert_clean_error(run(capsys, "explain", tmp_path / "inf.tif", "--model", run_dir, "--out", out, *FAST),
                       "inf.tif: 1 pixel(s) are NaN or infinite")
    Image.new("L", (7999, 7999)).save(tmp_path / "huge.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "huge.png").read_bytes()[:300])
    assert_clean_error(run(capsys, "explain", tmp_path / "cut.png", "--model", run_dir, "--out", out, *FAST),
                       "truncated or corrupt PNG")
    assert not out.exists()


# ---------------------------------------------------------------- 4. arguments
@pytest.mark.parametrize("args, fragment", [
    (["actmax", "--pairs", "1+"], "--pairs"),
    (["actmax", "--pairs", "a+b"], "--pairs"),
    (["actmax", "--seed", "-1"], "--seed"),
    (["actmax", "--seed", str(2**70)], "--seed"),
    (["actmax", "--steps", "-3"], "--steps"),
    (["actmax", "--steps", "0"], "--steps"),
    (["evaluate", "--steps", "0"], "--steps"),
    (["stats", "--limit", "0"], "--limit"),
    (["stats", "--limit", "-5"], "--limit"),
    (["train", "--seed", "-1"], "--seed"),
    (["explain", "--batch-size", "0"], "--batch-size"),
    (["explain", "--no-such-option"], "unrecognized arguments"),
    (["stats", "--split", "valid"], "--split"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_option_values_are_one_line_naming_the_option(capsys, tmp_path, args, fragment):
    res = run(capsys, *args, "--out", tmp_path / "out") if args[0] != "frobnicate" else run(capsys, *args)
    assert_clean_error(res, fragment)
    assert not (tmp_path / "out").exists()


def test_a_symlink_loop_is_described_one_way(capsys, tmp_path, run_dir, images):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    for args in (("explain", loop, "--model", run_dir), ("explain", images[0], "--model", loop),
                 ("featuremaps", "--image", loop, "--model", run_dir)):
        assert_clean_error(run(capsys, *args, "--out", tmp_path / "out"), "loop.png: symbolic link loop")


# ---------------------------------------------------------------- 5. consistency
def test_evaluate_exits_1_when_images_were_skipped(capsys, tmp_path, run_dir, images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = run(capsys, "evaluate", "--model", run_dir, "--images", images[0], images[1], bad, "--methods",
              "gradcam", "--steps", "4", "--sanity-images", "0", "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [f"convlens: skipped: {bad}: not a readable image "
                                               "(cannot identify image file '" + str(bad) + "')"]
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["skipped"]


def test_stats_data_names_and_skips_unreadable_entries(capsys, tmp_path, run_dir):
    data = tmp_path / "data"
    for c in ("0", "1"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            digit_png(data / c / f"{i}.png", i)
    (data / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "1" / "folder.png").mkdir()
    res = run(capsys, "stats", "--model", run_dir, "--data", data, "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and "broken.png" in lines[0] and "folder.png" in lines[1]
    assert all(line.startswith("convlens: skipped: ") for line in lines)
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert len(summary["skipped"]) == 2


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"key": {"a": 1}}', '{"result": 1}'])
def test_a_damaged_stage_marker_is_recomputed(tmp_path, damage):
    from convlens.report.lab import LabOptions, run_stage

    opts = LabOptions(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stage.json").write_text(damage)
    calls = []
    timings = {}
    result = run_stage(opts, "s", {"a": 1}, lambda folder: calls.append(folder) or {"value": 7}, timings)
    assert result == {"value": 7} and len(calls) == 1 and timings["s"]["cached"] is False
    again = run_stage(opts, "s", {"a": 1}, lambda folder: calls.append(folder) or {"value": 8}, timings)
    assert again == {"value": 7} and len(calls) == 1  # the rewritten marker is used


def test_a_failing_stage_removes_what_it_wrote_but_keeps_its_checkpoints(tmp_path):
    from convlens.io import unrecorded, write_json
    from convlens.report.stages import run_stage

    def work(folder):
        write_json(folder / "figure.json", {"partial": True})
        with unrecorded():
            write_json(folder / "checkpoint.json", {"next": 1})
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        run_stage(tmp_path, "s", {"a": 1}, work, {})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["checkpoint.json"]  # no stage.json either


def test_the_lab_names_its_own_option_when_a_resume_does_not_fit(tmp_path, monkeypatch):
    from convlens.models.labnet import LabNet
    from convlens.io import save_torch
    from convlens.report import lab
    from convlens.training import checkpoint_dict

    (tmp_path / "train").mkdir()
    save_torch(tmp_path / "train" / "checkpoint.pt", checkpoint_dict(LabNet(), {"recipe": {}, "seed": 5}))
    monkeypatch.setattr("convlens.training.prepare_data", lambda *a, **k: ((torch.zeros(1, 1, 28, 28),) * 2,) * 3)
    with pytest.raises(ConvlensError) as err:
        lab.stage_train(lab.LabOptions(tmp_path, fast=True), {})
    assert "--retrain" in str(err.value) and "--resume" not in str(err.value)


# ---------------------------------------------------------------- 6. scale
def test_explain_streams_bounded_batches_into_one_file_and_contact_sheets(capsys, tmp_path, run_dir, monkeypatch):
    from convlens import explain as ex

    folder = tmp_path / "many"
    folder.mkdir()
    n = ex.CONTACT_SHEET_THRESHOLD + 21
    for i in range(n):
        digit_png(folder / f"{i:04d}.png", i)
    seen = []
    real = ex.run_methods
    monkeypatch.setattr(ex, "run_methods", lambda loaded, x, *a, **k: seen.append(len(x)) or real(loaded, x, *a, **k))
    res = run(capsys, "explain", folder, "--model", run_dir, "--out", tmp_path / "out", "--batch-size", "16", *FAST)
    assert res.returncode == 0, res.stderr
    assert seen == [16] * (n // 16) + [n % 16]
    names = listing(tmp_path / "out")
    assert names == ["maps.npz", "predictions.json"] + [f"sheet-{k:03d}.png" for k in range(1, -(-n // 20) + 1)]
    maps = np.load(tmp_path / "out" / "maps.npz")
    assert maps["gradcam_map"].shape == (n, 28, 28)
    assert list(maps["images"]) == sorted(os.listdir(folder))
    # the rows equal a one-image run of the same file (batching changes nothing)
    alone = run(capsys, "explain", folder / "0042.png", "--model", run_dir, "--out", tmp_path / "one", *FAST)
    assert alone.returncode == 0
    one = np.load(tmp_path / "one" / "maps.npz")
    np.testing.assert_allclose(maps["saliency_raw"][42], one["saliency_raw"][0], rtol=1e-5, atol=1e-7)
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["figures"]["0042.png"] == {"sheet": "sheet-003.png", "row": 2}


def test_a_run_that_cannot_fit_says_how_much_memory_it_needs(capsys, tmp_path, run_dir, images, monkeypatch):
    from convlens import explain as ex

    monkeypatch.setattr(ex, "available_bytes", lambda: 2**14)
    res = run(capsys, "explain", *images, "--model", run_dir, "--out", tmp_path / "out", *FAST)
    assert_clean_error(res, "this run needs about")
    assert "only 16 KiB is available" in res.stderr and not (tmp_path / "out").exists()

    def exhausted(*_a, **_k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8053063680 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.undo()
    monkeypatch.setattr(ex, "run_methods", exhausted)
    res = run(capsys, "explain", *images, "--model", run_dir, "--out", tmp_path / "out", *FAST)
    assert_clean_error(res, "out of memory (an allocation of 7.5 GiB failed)")
    assert not (tmp_path / "out").exists()


def test_batch_plan_formula():
    from convlens.batching import plan_batch_size

    mib = 2**20
    plan = plan_batch_size(10 * mib, 2 * mib, inner_chunk=4, available=400 * mib)
    assert (plan.per_image, plan.fixed) == (12 * mib, 40 * mib)
    assert plan.batch_size == (200 - 40) // 12  # half of what is available
    assert plan_batch_size(10 * mib, 0, 0, available=None).batch_size == 32
    assert plan_batch_size(10 * mib, 0, 0, requested=3, available=400 * mib).batch_size == 3
    with pytest.raises(ConvlensError, match="needs about 52 MiB"):
        plan_batch_size(10 * mib, 2 * mib, inner_chunk=4, available=50 * mib)
