"""Shared fixtures. Plain `pytest` runs the fast tests (pyproject: -m "not slow"); `make test` runs all.

A test is slow when it trains a network (uses a fixture in ``TRAINING_FIXTURES``) or runs convlens in
a subprocess (calls ``run_cli`` or ``subprocess``); such tests get the ``slow`` mark automatically here,
any other long test marks itself with ``@pytest.mark.slow``.
"""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CONVLENS_TEST_THREADS", "2")))
ROOT = Path(__file__).resolve().parents[1]
TRAINING_FIXTURES = {"trained_run", "lab_model", "lab_dir"}


def runs_a_subprocess(function) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return "run_cli(" in source or "subprocess." in source


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) or (function and runs_a_subprocess(function)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A lab network trained briefly (1 epoch on a subset): enough to have structure."""
    from convlens.training import make_recipe, train

    out = tmp_path_factory.mktemp("run")
    train(out, make_recipe("best", epochs=2), seed=0, progress=False, subset=12000)
    return out


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory) -> Path:
    """`convlens lab --fast` by one process (shared by tests/test_lab.py and the distributed lab test)."""
    out = tmp_path_factory.mktemp("lab")
    proc = run_cli("lab", "--fast", "--out", out, "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("index.html")
    return out


@pytest.fixture(scope="session")
def lab_model(trained_run):
    from convlens.models import load_model

    return load_model(str(trained_run))


@pytest.fixture(scope="session")
def lite0():
    from convlens.models import load_model

    return load_model("efficientnet-lite0")


@pytest.fixture(scope="session")
def mnist_test():
    from convlens.data import load_mnist

    return load_mnist("test").tensors()


def run_cli(*args, timeout=300, env=None):
    """Run ``python -m convlens ARGS``; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "convlens", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_clean_error(proc, fragment: str = ""):
    """Exit code 2, one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]
