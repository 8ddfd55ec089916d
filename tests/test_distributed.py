"""Distributed runs: shards, resumable folds, collectives, and `torchrun` jobs equal to one process."""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from convlens import distributed
from convlens.errors import ConvlensError
from convlens.io import save_torch
from convlens.stats import FilterStats

from conftest import ROOT

SUM_KEYS = ("mean_map", "score", "std", "contrast")   # from float sums: ≤ 1e-6 relative
EXACT_KEYS = ("count", "max", "rank", "win_rate")       # counts and maxima: exact


# ---------------------------------------------------------------- in-process
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_cover_every_item_once_in_order(world):
    for count in range(0, 40):
        blocks = [distributed.shard(count, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(count))
        sizes = [len(b) for b in blocks]
        assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_requests():
    with pytest.raises(ValueError):
        distributed.shard(5, 2, 2)


def test_filter_stats_state_round_trips_through_a_checkpoint(tmp_path, mnist_test):
    from convlens.models import LabNet
    from convlens.stats import collect

    torch.manual_seed(0)
    x, y = mnist_test
    stats = collect(LabNet().eval(), [(x[:64], y[:64])], ["l1", "l3"], 10)
    save_torch(tmp_path / "s.pt", stats.state())
    back = FilterStats.from_state(torch.load(tmp_path / "s.pt", weights_only=True))
    for layer in ("l1", "l3"):
        a, b = stats.layer(layer), back.layer(layer)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert back.counts.tolist() == torch.bincount(y[:64], minlength=10).tolist()


def test_fold_resumes_without_recomputing_finished_steps(tmp_path, monkeypatch):
    """A fault at step 2 keeps the checkpoint of steps 0-1; --resume computes only the rest."""
    monkeypatch.setenv(distributed.CHECKPOINT_ENV, "0")
    calls = []

    def compute(lo, hi):
        calls.append(lo)
        return torch.arange(lo, hi, dtype=torch.long).sum()

    def job(resume):
        return distributed.Job("sum", 11, 3, tmp_path, "k", resume=resume)

    monkeypatch.setenv(distributed.FAULT_ENV, "raise@0:2")
    with pytest.raises(RuntimeError, match="injected fault"):
        distributed.fold(job(False), compute, lambda s, p: s + p, torch.tensor(0))
    assert calls == [0, 3]
    monkeypatch.delenv(distributed.FAULT_ENV)
    calls.clear()
    resumed = job(True)
    total = distributed.fold(resumed, compute, lambda s, p: s + p, torch.tensor(0))
    assert calls == [6, 9]
    assert int(total) == sum(range(11)) and resumed.resumed == 6
    resumed.cleanup()
    assert not (tmp_path / distributed.WORK_DIR).exists()


def test_deal_emits_every_step_once_in_order_and_honours_the_fault_hook(monkeypatch):
    emitted = []
    job = distributed.Job("deal", 11, 3)
    distributed.deal(job, lambda lo, hi: list(range(lo, hi)), emitted.append)
    assert emitted == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    emitted.clear()
    monkeypatch.setenv(distributed.FAULT_ENV, "raise@0:1")
    with pytest.raises(RuntimeError, match="injected fault at step 1"):
        distributed.deal(job, lambda lo, hi: list(range(lo, hi)), emitted.append)
    assert emitted == [[0, 1, 2]]


def test_fingerprint_depends_on_options_and_weights():
    from convlens.models import LabNet

    torch.manual_seed(0)
    a, b = LabNet(), LabNet()
    key = distributed.fingerprint(a, layers=["l1"])
    assert key == distributed.fingerprint(a, layers=["l1"])
    assert key != distributed.fingerprint(a, layers=["l2"])
    assert key != distributed.fingerprint(b, layers=["l1"])


# ---------------------------------------------------------------- torchrun jobs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            distributed.CHECKPOINT_ENV: "0", **extra}


def torchrun(*args, procs=2, module=True, env=None, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    target = ["-m", "convlens"] if module else []
    return subprocess.run(launcher + target + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=job_env(**(env or {})))


def single(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "convlens", *map(str, args), "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout, env=job_env(**(env or {})))


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def assert_stats_equal(a_dir, b_dir):
    a, b = np.load(a_dir / "stats.npz"), np.load(b_dir / "stats.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        stat = key.split("/")[1]
        if stat in EXACT_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert stat in SUM_KEYS
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-12 * np.abs(a[key]).max(), err_msg=key)
    ja, jb = json.loads((a_dir / "stats.json").read_text()), json.loads((b_dir / "stats.json").read_text())
    assert ja["counts"] == jb["counts"]
    for layer in ja["layers"]:
        for c in ja["layers"][layer]["per_class"]:
            assert ja["layers"][layer]["per_class"][c]["ranked_filters"] == jb["layers"][layer]["per_class"][c][
                "ranked_filters"]


STATS_N = 1999  # 4 batches of ≤ 500: rank 0 gets 1000 images, rank 1 999 (uneven)


@pytest.fixture(scope="module")
def stats_single(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats1")
    proc = single("stats", "--model", trained_run, "--out", out, "--limit", STATS_N, "--layers", "l1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_collectives_under_torchrun(tmp_path):
    """all_reduce_tree: exact SUM of counts, MAX of maxima (−inf kept); gather_ordered: dataset order."""
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from convlens import distributed as d
        d.setup()
        r, w = d.rank(), d.world_size()
        block = d.shard(7)
        tree = {"counts": torch.tensor([r + 1, 10 * r], dtype=torch.long),
                "inner": {"max": torch.tensor([float(r), -float("inf"), -r], dtype=torch.float64),
                          "sum": torch.tensor([0.1 * (r + 1)], dtype=torch.float64)}}
        d.all_reduce_tree(tree)
        items = d.gather_ordered(block.start, [f"item{i}" for i in block])
        if d.is_writer():
            json.dump({"world": w, "counts": tree["counts"].tolist(), "max": tree["inner"]["max"].tolist(),
                       "sum": tree["inner"]["sum"].tolist(), "items": items}, open(sys.argv[1], "w"))
        d.teardown()
    """))
    result = tmp_path / "result.json"
    proc = torchrun(script, result, procs=3, module=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(result.read_text().replace("-Infinity", '"-inf"'))
    assert got["world"] == 3
    assert got["counts"] == [6, 30]
    assert got["max"] == [2.0, "-inf", 0.0]
    assert got["sum"][0] == pytest.approx(0.6, rel=1e-15)
    assert got["items"] == [f"item{i}" for i in range(7)]


@pytest.mark.slow
def test_stats_two_processes_equal_one(trained_run, stats_single, tmp_path):
    out = tmp_path / "stats2"
    proc = torchrun("stats", "--model", trained_run, "--out", out, "--limit", STATS_N, "--layers", "l1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("stats.json") == 1  # rank 0 alone reports
    assert_stats_equal(stats_single, out)
    assert json.loads((out / "stats.json").read_text())["counts"] == torch.bincount(
        torch.from_numpy(__import__("convlens.data", fromlist=["x"]).load_mnist("test").labels[:STATS_N].copy()),
        minlength=10).tolist()
    assert visible(out) == visible(stats_single)
    assert not (out / distributed.WORK_DIR).exists()


def assert_one_error_line(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("convlens: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "/convlens/" not in proc.stderr  # no traceback from the ranks (the launcher's own report aside)


@pytest.mark.slow
def test_failing_rank_stops_the_job_cleanly_and_resume_finishes_it(trained_run, stats_single, tmp_path):
    out = tmp_path / "fail"
    args = ("stats", "--model", trained_run, "--out", out, "--limit", STATS_N, "--layers", "l1", "--quiet")
    proc = torchrun(*args, env={distributed.FAULT_ENV: "raise@1:1"})
    assert_one_error_line(proc, "rank 1 failed", "injected fault at step 1")
    assert visible(out) == []
    assert not list(out.rglob("*.tmp"))
    resumed = torchrun(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    line = next(x for x in resumed.stderr.splitlines() if x.startswith("convlens: resumed"))
    assert int(line.split()[2].replace(",", "")) >= 500  # at least rank 1's finished batch was reused
    assert_stats_equal(stats_single, out)


@pytest.mark.slow
def test_killed_rank_stops_the_job_cleanly(trained_run, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun("stats", "--model", trained_run, "--out", out, "--limit", STATS_N, "--layers", "l1", "--quiet",
                    env={distributed.FAULT_ENV: "kill@1:1"})
    assert_one_error_line(proc, "rank 0 stopped", "lost contact with rank 1")
    assert visible(out) == []
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_evaluate_two_processes_equal_one(trained_run, tmp_path):
    args = ("evaluate", "--model", trained_run, "--mnist-test", 64, "--methods", "gradcam,saliency",
            "--sanity-images", 0, "--no-data-randomization", "--quiet")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = single(*args, "--out", one)
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(*args, "--out", two)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("evaluation.json") == 1
    a, b = json.loads((one / "evaluation.json").read_text()), json.loads((two / "evaluation.json").read_text())
    assert b["images"] == [f"test{i}" for i in range(64)]
    assert a["images"] == b["images"] and a["targets"] == b["targets"]
    for method in ("gradcam", "saliency"):
        for metric in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
            assert b["table"][method][metric] == pytest.approx(a["table"][method][metric], rel=1e-6, abs=1e-12)
        for curve in ("deletion_mean", "insertion_mean"):
            np.testing.assert_allclose(b["curves"][method][curve], a["curves"][method][curve], rtol=1e-6)
    assert visible(one) == visible(two)


@pytest.mark.slow
def test_stuck_rank_times_out_as_one_line(trained_run, tmp_path):
    out = tmp_path / "stuck"
    proc = torchrun("stats", "--model", trained_run, "--out", out, "--limit", STATS_N, "--layers", "l1", "--quiet",
                    env={distributed.FAULT_ENV: "hang@1:0", distributed.TIMEOUT_ENV: "5"})
    assert_one_error_line(proc, "rank 0 stopped", "lost contact with rank 1", "5 s timeout")
    assert visible(out) == []


@pytest.mark.slow
def test_stats_of_a_labelled_folder_two_processes_equal_one(trained_run, mnist_test, tmp_path):
    """300 images in 3 class folders (2 steps of 256: uneven) and one unreadable file, named by both runs."""
    from PIL import Image

    x, y = mnist_test
    folder = tmp_path / "digits"
    for digit in (0, 1, 7):
        (folder / str(digit)).mkdir(parents=True)
        for i in (y == digit).nonzero()[:100, 0].tolist():
            Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folder / str(digit) / f"{i:05d}.png")
    (folder / "7" / "broken.png").write_bytes(b"not a png")
    args = ("stats", "--model", trained_run, "--data", folder, "--layers", "l1", "--quiet")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = single(*args, "--out", one)
    assert proc.returncode == 1, proc.stderr  # exit 1: a file was skipped
    proc = torchrun(*args, "--out", two)
    assert proc.returncode != 0 and "convlens: error" not in proc.stderr, proc.stderr
    assert sum("broken.png" in line for line in proc.stderr.splitlines()) == 1  # named once, by its rank
    assert_stats_equal(one, two)
    ja, jb = (json.loads((d / "stats.json").read_text()) for d in (one, two))
    assert ja["skipped"] == jb["skipped"] and len(jb["skipped"]) == 1 and "broken.png" in jb["skipped"][0]
    assert sum(jb["counts"]) == 300


@pytest.mark.slow
def test_unsharded_command_runs_once_on_rank_zero(trained_run):
    proc = torchrun("summary", "--model", trained_run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("rank 0 runs it alone") == 1
    assert proc.stdout.count("7,465") == 1  # the lab network's parameter count, printed once


@pytest.mark.slow
def test_error_on_every_rank_is_printed_once(trained_run, tmp_path):
    proc = torchrun("stats", "--model", trained_run, "--out", tmp_path / "bad", "--layers", "nosuchlayer", "--quiet")
    assert_one_error_line(proc, "failed", "nosuchlayer")
    assert visible(tmp_path / "bad") == []


@pytest.mark.slow
def test_predict_two_processes_equal_one(trained_run, mnist_test, tmp_path):
    """7 readable images (blocks of 4 and 4 files, one unreadable): the same rows, in file order."""
    from PIL import Image

    x, _ = mnist_test
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folder / f"img{i}.png")
    (folder / "img3b.png").write_bytes(b"broken")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    proc = single("predict", folder, "--model", trained_run, "--json", one)
    assert proc.returncode == 1, proc.stderr  # a skipped file
    proc = torchrun("predict", folder, "--model", trained_run, "--json", two)
    assert proc.returncode != 0
    assert sum("img3b.png" in line for line in proc.stderr.splitlines()) == 1
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [r["image"] for r in b] == [f"img{i}.png" for i in range(7)]
    assert [(r["image"], r["predicted"]) for r in a] == [(r["image"], r["predicted"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["probability"] == pytest.approx(ra["probability"], rel=1e-5)


def mnist_pngs(folder, x, count, broken=None):
    from PIL import Image

    folder.mkdir()
    for i in range(count):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folder / f"img{i:02d}.png")
    if broken:
        (folder / broken).write_bytes(b"not a png")
    return folder


def explain_both(folder, tmp_path, trained_run, *options):
    """`explain` by one process and by torchrun with 2 ranks: (one, two, torchrun's process)."""
    args = ("explain", folder, "--model", trained_run, "--methods", "gradcam,saliency", "--quiet", *options)
    one, two = tmp_path / "one", tmp_path / "two"
    first = single(*args, "--out", one)
    assert first.returncode in (0, 1), first.stderr
    proc = torchrun(*args, "--out", two)
    assert proc.returncode == first.returncode and "convlens: error" not in proc.stderr, proc.stderr
    assert proc.stdout.count("predictions.json") == 1  # rank 0 alone reports
    return one, two, proc


def assert_explain_equal(one, two, names):
    a, b = np.load(one / "maps.npz"), np.load(two / "maps.npz")
    assert sorted(a.files) == sorted(b.files) == sorted(
        ["images"] + [f"{m}_{kind}" for m in ("gradcam", "saliency") for kind in ("raw", "map")])
    assert a["images"].tolist() == b["images"].tolist() == names
    for key in a.files:
        if key != "images":
            assert a[key].shape == b[key].shape and a[key].shape[0] == len(names)
            assert np.abs(b[key]).max() > 0
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    ja, jb = (json.loads((d / "predictions.json").read_text()) for d in (one, two))
    assert [r["image"] for r in jb["predictions"]] == names
    for ra, rb in zip(ja["predictions"], jb["predictions"]):
        assert {k: v for k, v in ra.items() if k not in ("probability", "top")} == \
            {k: v for k, v in rb.items() if k not in ("probability", "top")}
        assert rb["probability"] == pytest.approx(ra["probability"], rel=1e-6)
        assert [t["index"] for t in ra["top"]] == [t["index"] for t in rb["top"]]
    assert ja["figures"] == jb["figures"] and ja["layers"] == jb["layers"] and ja["skipped"] == jb["skipped"]
    assert visible(one) == visible(two)
    return ja, jb


@pytest.mark.slow
def test_explain_two_processes_equal_one(trained_run, mnist_test, tmp_path):
    """7 readable images and one unreadable (steps of 4: one per rank, uneven): the same maps.npz,
    prediction rows, figures and skipped file as one process; the bad file named once."""
    folder = mnist_pngs(tmp_path / "images", mnist_test[0], 7, broken="img03b.png")
    one, two, proc = explain_both(folder, tmp_path, trained_run)
    assert proc.returncode == 1  # a skipped file, as one process
    assert sum("img03b.png" in line for line in proc.stderr.splitlines()) == 1
    _, jb = assert_explain_equal(one, two, [f"img{i:02d}.png" for i in range(7)])
    assert len(jb["skipped"]) == 1 and "img03b.png" in jb["skipped"][0]
    assert "img06_methods.png" in visible(two)


@pytest.mark.slow
def test_explain_contact_sheets_two_processes_equal_one(trained_run, mnist_test, tmp_path):
    """26 images in 9 steps of 3 (rank 0 takes 5, rank 1 4): maps equal, the same contact sheets byte for byte."""
    folder = mnist_pngs(tmp_path / "images", mnist_test[0], 26)
    one, two, proc = explain_both(folder, tmp_path, trained_run, "--batch-size", 3)
    assert proc.returncode == 0
    assert_explain_equal(one, two, [f"img{i:02d}.png" for i in range(26)])
    assert visible(two) == ["maps.npz", "predictions.json", "sheet-001.png", "sheet-002.png"]
    for sheet in ("sheet-001.png", "sheet-002.png"):
        assert (one / sheet).read_bytes() == (two / sheet).read_bytes()


@pytest.mark.slow
def test_explain_failing_rank_leaves_no_outputs(trained_run, mnist_test, tmp_path):
    """Rank 1 fails in round 2, after rank 0 has written the figures of rounds 0-1: all of them go."""
    folder = mnist_pngs(tmp_path / "images", mnist_test[0], 7)
    out = tmp_path / "fail"
    proc = torchrun("explain", folder, "--model", trained_run, "--methods", "gradcam,saliency", "--quiet",
                    "--batch-size", 1, "--out", out, env={distributed.FAULT_ENV: "raise@1:2"})
    assert_one_error_line(proc, "rank 1 failed", "injected fault at step 2")
    assert visible(out) == []
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- report and lab
def digit_folder(folder, x, y, digits=(0, 1, 7), per_digit=100, broken="7/broken.png"):
    """A labelled folder of MNIST test digits (PNG), one sub-folder per digit, and one unreadable file."""
    from PIL import Image

    for digit in digits:
        (folder / str(digit)).mkdir(parents=True)
        for i in (y == digit).nonzero()[:per_digit, 0].tolist():
            Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folder / str(digit) / f"{i:05d}.png")
    if broken:
        (folder / broken).write_bytes(b"not a png")
    return folder


def stage_result(out, stage):
    return json.loads((out / stage / "stage.json").read_text())["result"]


def without_record(page: str) -> str:
    """The page without its run-record section (timings and date differ from run to run)."""
    kept, removed = re.subn(r"<section id=['\"]record['\"]>.*?</section>", "", page, flags=re.S)
    assert removed == 1
    return kept


def assert_evaluation_equal(a, b):
    assert a["images"] == b["images"] and a["targets"] == b["targets"] and a["skipped"] == b["skipped"]
    assert a["table"].keys() == b["table"].keys()
    for method in a["table"]:
        for metric in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
            assert b["table"][method][metric] == pytest.approx(a["table"][method][metric], rel=1e-6, abs=1e-12)
        for curve in ("deletion_mean", "insertion_mean"):
            np.testing.assert_allclose(b["curves"][method][curve], a["curves"][method][curve], rtol=1e-6)
    assert ("sanity" in a) == ("sanity" in b)
    if "sanity" in a:
        np.testing.assert_allclose(flat_numbers(b["sanity"]), flat_numbers(a["sanity"]), rtol=1e-6, atol=1e-9)


def flat_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [v for k in sorted(tree) for v in flat_numbers(tree[k])]
    if isinstance(tree, list):
        return [v for item in tree for v in flat_numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_report_two_processes_equal_one(trained_run, mnist_test, tmp_path):
    """`report` on 300 digits in 3 class folders and one unreadable file: accuracy (2 steps of 256:
    uneven), statistics, explanations and faithfulness split across 2 ranks equal one process; rank 0
    alone writes; the pages are equal apart from the run record; a second torchrun run reuses every stage."""
    x, y = mnist_test
    folder = digit_folder(tmp_path / "digits", x, y)
    args = ("report", "--model", trained_run, "--data", folder, "--methods", "gradcam,saliency", "--quiet")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = single(*args, "--out", one)
    assert proc.returncode == 0, proc.stderr
    proc = torchrun(*args, "--out", two)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str((two / "index.html").resolve())  # printed once, by rank 0
    assert sum("broken.png" in line for line in proc.stderr.splitlines()) == 2  # accuracy and stats, once each
    assert "rank 0 runs it alone" not in proc.stderr

    a, b = stage_result(one, "accuracy"), stage_result(two, "accuracy")
    assert b["confusion"] == a["confusion"] and b["images"] == a["images"] == 300
    assert b["accuracy"] == a["accuracy"] and b["skipped"] == a["skipped"] and len(b["skipped"]) == 1
    assert [{k: v for k, v in r.items() if k != "probability"} for r in b["rows"]] == \
        [{k: v for k, v in r.items() if k != "probability"} for r in a["rows"]]
    np.testing.assert_allclose([r["probability"] for r in b["rows"]], [r["probability"] for r in a["rows"]], rtol=1e-6)
    assert sum(map(sum, b["confusion"])) == 300
    assert_stats_equal(one / "stats", two / "stats")
    names = [r["image"] for r in stage_result(one, "explain")["predictions"]]
    assert len(names) == 6  # 2 per class
    assert_explain_equal(one / "explain", two / "explain", names)
    assert_evaluation_equal(json.loads((one / "evaluate" / "evaluation.json").read_text()),
                            json.loads((two / "evaluate" / "evaluation.json").read_text()))
    assert stage_result(two, "actmax")["probabilities"] == stage_result(one, "actmax")["probabilities"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for summary in (sa, sb):  # timings differ from run to run
        del summary["run"]
        for row in summary["faithfulness"].values():
            del row["seconds_per_image"]
    assert sa == sb
    assert without_record((one / "index.html").read_text()) == without_record((two / "index.html").read_text())
    assert visible(one) == visible(two)
    for stage in ("accuracy", "stats", "actmax", "explain", "evaluate"):
        assert visible(one / stage) == visible(two / stage), stage
    assert not list(two.rglob(distributed.WORK_DIR))

    again = torchrun(*args, "--out", two)
    assert again.returncode == 0, again.stderr
    timings = json.loads((two / "summary.json").read_text())["run"]["timings"]
    assert all(timings[s]["cached"] for s in ("accuracy", "stats", "actmax", "explain", "evaluate"))


@pytest.mark.slow
def test_report_failing_rank_leaves_no_outputs(trained_run, mnist_test, tmp_path):
    """Rank 1 fails in the accuracy stage: one error line, no page, no stage result, no file at all."""
    x, y = mnist_test
    folder = digit_folder(tmp_path / "digits", x, y, per_digit=40, broken=None)
    out = tmp_path / "fail"
    proc = torchrun("report", "--model", trained_run, "--data", folder, "--methods", "gradcam", "--quiet",
                    "--out", out, env={distributed.FAULT_ENV: "raise@1:0"})
    assert_one_error_line(proc, "rank 1 failed", "injected fault at step 0")
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_lab_two_processes_equal_one(lab_dir, tmp_path):
    """`lab --fast` under torchrun (2 ranks), its training stage resumed from the one-process run's last
    checkpoint (the same weights, whatever the thread count): rank 0 runs the training stage while rank 1
    waits, then sends it the network; statistics, explanations and faithfulness equal one process."""
    import shutil

    out = tmp_path / "lab2"
    out.mkdir()
    shutil.copytree(lab_dir / "train", out / "train")
    for done in ("stage.json", "model.pt"):
        (out / "train" / done).unlink()
    proc = torchrun("lab", "--fast", "--out", out, "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str((out / "index.html").resolve())
    timings = json.loads((out / "summary.json").read_text())["run"]["timings"]
    assert timings["train"]["cached"] is False and (out / "train" / "model.pt").is_file()
    assert not any(timings[s]["cached"] for s in ("featuremaps", "stats", "actmax", "explain", "evaluate"))
    assert_stats_equal(lab_dir / "stats", out / "stats")
    assert_evaluation_equal(json.loads((lab_dir / "evaluate" / "evaluation.json").read_text()),
                            json.loads((out / "evaluate" / "evaluation.json").read_text()))
    ea, eb = np.load(lab_dir / "explain" / "maps.npz"), np.load(out / "explain" / "maps.npz")
    assert sorted(ea.files) == sorted(eb.files)
    for key in ea.files:  # one process runs 2 threads, each rank 1: float32 sums in another order
        if key != "images":
            np.testing.assert_allclose(eb[key], ea[key], rtol=1e-5, atol=1e-6, err_msg=key)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (lab_dir, out))
    assert sa["exercise1"] == sb["exercise1"] and sa["exercise2"] == sb["exercise2"]
    assert sa["faithfulness"]["best_deletion"] == sb["faithfulness"]["best_deletion"]
    for stage in ("featuremaps", "stats", "actmax", "explain", "evaluate"):
        assert visible(lab_dir / stage) == visible(out / stage), stage
    assert not list(out.rglob(distributed.WORK_DIR))


# ---------------------------------------------------------------- several machines, SLURM
STATS_ARGS = ("--limit", STATS_N, "--layers", "l1", "--quiet")


def wait_all(procs, timeout=300):
    """Wait for every process; kill the rest when one overruns. Returns [(returncode, stdout, stderr)]."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_stats_on_two_nodes_equal_one(trained_run, stats_single, tmp_path):
    """Two separate torchrun launches as two "nodes" (static rendezvous on 127.0.0.1, one process
    each): the statistics equal one process, node 0's rank writes them, node 1 prints nothing."""
    out, port = tmp_path / "stats-nodes", free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "convlens", "stats", "--model", str(trained_run), "--out", str(out), *map(str, STATS_ARGS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env()) for node in (0, 1)]
    (code0, stdout0, err0), (code1, stdout1, err1) = wait_all(procs)
    assert code0 == 0 and code1 == 0, err0 + err1
    assert stdout0.count("stats.json") == 1 and stdout1 == ""
    assert_stats_equal(stats_single, out)
    assert visible(out) == visible(stats_single)
    assert not (out / distributed.WORK_DIR).exists()


def fake_srun(args, tasks=2, extra_env=None, timeout=300):
    """What `srun --ntasks N convlens ARGS` starts: N plain processes with SLURM's task variables (and
    MASTER_ADDR/MASTER_PORT, as a batch script exports them), no torchrun variables."""
    port = free_port()
    base = {k: v for k, v in job_env().items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    procs = [subprocess.Popen([sys.executable, "-m", "convlens", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(task),
                                   "SLURM_LOCALID": str(task), "SLURM_NTASKS": str(tasks),
                                   "SLURM_STEP_NUM_TASKS": str(tasks), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), **(extra_env or {})})
             for task in range(tasks)]
    return wait_all(procs, timeout)


@pytest.mark.slow
def test_stats_started_by_srun_without_torchrun_equal_one(trained_run, stats_single, tmp_path):
    out = tmp_path / "stats-srun"
    results = fake_srun(("stats", "--model", trained_run, "--out", out, *STATS_ARGS))
    assert [code for code, _, _ in results] == [0, 0], "".join(err for _, _, err in results)
    assert results[0][1].count("stats.json") == 1 and results[1][1] == ""  # task 0 alone reports
    assert_stats_equal(stats_single, out)
    assert visible(out) == visible(stats_single)
    assert not (out / distributed.WORK_DIR).exists()


@pytest.mark.slow
def test_failing_srun_task_stops_every_task_with_one_line(trained_run, tmp_path):
    out = tmp_path / "srun-fail"
    results = fake_srun(("stats", "--model", trained_run, "--out", out, *STATS_ARGS),
                        extra_env={distributed.FAULT_ENV: "raise@1:1"})
    assert [code for code, _, _ in results] == [2, 2]
    lines = [line for _, _, err in results for line in err.splitlines() if line.startswith("convlens: error:")]
    assert lines == ["convlens: error: rank 1 failed: RuntimeError: injected fault at step 1"]
    assert visible(out) == []


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
              "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}


def test_srun_task_variables_map_to_torchrun_ones():
    assert distributed.slurm_task_environment(SLURM_TASK) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("change", [
    {"RANK": "0", "WORLD_SIZE": "4"},             # torchrun under srun: torchrun's variables win
    {"SLURM_STEP_NUM_TASKS": "1"},                # a step of one task: one process
    {"SLURM_STEP_NUM_TASKS": None},               # the batch script itself (SLURM_NTASKS=4, SLURM_PROCID=0)
    {"SLURM_PROCID": None},
])
def test_no_srun_task_mapping_where_it_does_not_apply(change):
    env = {**SLURM_TASK, **change}
    assert distributed.slurm_task_environment({k: v for k, v in env.items() if v is not None}) is None


def test_srun_task_without_master_address_is_one_clear_error():
    env = {k: v for k, v in SLURM_TASK.items() if k != "MASTER_ADDR"}
    with pytest.raises(ConvlensError, match="task 3 of 4 without torchrun: set MASTER_ADDR"):
        distributed.slurm_task_environment(env)


@pytest.mark.slow
def test_lab_training_failure_on_rank_zero_stops_the_waiting_rank_with_one_line(lab_dir, tmp_path):
    """Rank 0 cannot resume the training (a checkpoint of another seed) while rank 1 waits for the
    network: one error line, from rank 0, and no page."""
    out = tmp_path / "lab-bad"
    (out / "train").mkdir(parents=True)
    (out / "train" / "checkpoint.pt").write_bytes((lab_dir / "train" / "checkpoint.pt").read_bytes())
    proc = torchrun("lab", "--fast", "--seed", 1, "--out", out, "--quiet")
    assert_one_error_line(proc, "rank 0 failed", "--retrain")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["checkpoint.pt"]
