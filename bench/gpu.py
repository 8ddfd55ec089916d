"""CUDA paths, checked against the CPU in one run (for a machine with a GPU).

    python bench/gpu.py [--out FILE.json] [--budget SECONDS]

1. two training epochs of the default recipe on CUDA (seconds, accuracy);
2. filter statistics of that network over the MNIST test split on CUDA against the CPU;
3. activation maximization sweep (80 images) on CUDA vs CPU seconds;
4. every attribution method on the lab network (64 digits) and on EfficientNet-Lite0 (2 shipped
   photos): normalized maps on CUDA against the CPU (max |diff|), seconds on each device.
Prints one line per check and writes everything to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def timed(fn, repeats: int = 3):
    """(result of the last call, median seconds) with CUDA synchronized."""
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def attribution_check(loaded_cpu, loaded_gpu, x: torch.Tensor, methods: list[str], label: str) -> dict:
    from convlens.attribution import METHODS, make_method

    rows = {}
    for name in methods:
        if name not in METHODS:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpu, t_cpu = timed(lambda: make_method(name, loaded_cpu.model).attribute(x, None), 1)
                gpu, t_gpu = timed(lambda: make_method(name, loaded_gpu.model).attribute(x.cuda(), None), 3)
            diff = float((cpu.normalized - gpu.normalized.cpu()).abs().max())
            same = bool(torch.equal(cpu.targets.cpu(), gpu.targets.cpu()))
            rows[name] = {"max_abs_diff_normalized": diff, "targets_equal": same, "cpu_s": t_cpu, "cuda_s": t_gpu}
            print(f"{label:<8}{name:<28} diff {diff:.2e}  targets equal {same}  cpu {t_cpu:.3f} s  cuda {t_gpu:.4f} s",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - report every method, go on
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{label:<8}{name:<28} ERROR {rows[name]['error']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check; later parts are skipped")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    from convlens.attribution import METHODS
    from convlens.data import load_mnist
    from convlens.data.images import open_image, sample_photo_paths
    from convlens.models import load_model
    from convlens.training import make_recipe, train

    begin = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    save = lambda: Path(a.out).write_text(json.dumps(report, indent=2))  # noqa: E731
    print(report, flush=True)
    methods = list(METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = train(tmp, make_recipe("best", epochs=2), seed=0, progress=False, device="cuda")
        report["train_two_epochs_cuda"] = {"seconds": time.perf_counter() - start,
                                           "test_accuracy": metrics["test_accuracy"]}
        print("train 2 epochs on cuda", report["train_two_epochs_cuda"], flush=True)
        save()
        lab_cpu, lab_gpu = load_model(tmp), load_model(tmp, device="cuda")
        xt, yt = load_mnist("test").tensors()

        from convlens import stats
        layers = ["l1", "l2", "l3"]
        s_cpu, t_cpu = timed(lambda: stats.collect(lab_cpu.model, stats.tensor_batches(xt, yt, 500), layers, 10), 1)
        s_gpu, t_gpu = timed(lambda: stats.collect(lab_gpu.model, ((xb.cuda(), yb.cuda()) for xb, yb in
                                                                  stats.tensor_batches(xt, yt, 500)), layers, 10), 3)
        diffs = {}
        for layer in layers:
            c, g = s_cpu.layer(layer), s_gpu.layer(layer)
            scale = max(float(abs(c["mean_map"]).max()), 1e-12)
            diffs[layer] = {"counts_equal": bool((c["count"] == g["count"]).all()),
                            "mean_map_rel": float(abs(c["mean_map"] - g["mean_map"]).max()) / scale,
                            "rank_equal": bool((c["rank"] == g["rank"]).all())}
        report["stats"] = {"cpu_s": t_cpu, "cuda_s": t_gpu, "layers": diffs}
        print("stats", report["stats"], flush=True)
        save()

        from convlens.featvis.objectives import class_logit
        from convlens.featvis.optimize import ActMaxConfig, maximize
        objs = [class_logit(c) for _ in range(8) for c in range(10)]
        cfg = ActMaxConfig(tv_weight=[2.0] * 80, progress=False)
        _, am_cpu = timed(lambda: maximize(lab_cpu.model, objs, (1, 28, 28), cfg), 1)
        _, am_gpu = timed(lambda: maximize(lab_gpu.model, objs, (1, 28, 28), cfg), 3)
        report["actmax_80"] = {"cpu_s": am_cpu, "cuda_s": am_gpu}
        print("actmax 80 images", report["actmax_80"], flush=True)
        save()
        report["labnet"] = attribution_check(lab_cpu, lab_gpu, xt[:64], methods, "labnet")
        save()

    lite_cpu, lite_gpu = load_model("efficientnet-lite0"), load_model("efficientnet-lite0", device="cuda")
    x = torch.stack([lite_cpu.preprocess(open_image(p)) for p in sample_photo_paths()[:2]])
    report["lite0"] = {}
    for name in methods:
        if time.perf_counter() - begin > a.budget:
            report["lite0"][name] = {"skipped": "time budget"}
            continue
        report["lite0"].update(attribution_check(lite_cpu, lite_gpu, x, [name], "lite0"))
        save()
    save()


if __name__ == "__main__":
    main()
