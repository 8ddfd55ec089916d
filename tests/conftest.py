import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CONVLENS_TEST_THREADS", "2")))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A lab network trained briefly (1 epoch on a subset): enough to have structure."""
    from convlens.training import make_recipe, train

    out = tmp_path_factory.mktemp("run")
    train(out, make_recipe("best", epochs=2), seed=0, progress=False, subset=12000)
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
