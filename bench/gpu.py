"""CUDA paths, checked against the CPU in one run (for a machine with a GPU).

    python bench/gpu.py [--out FILE.json] [--quick]

1. every attribution method on EfficientNet-Lite0 (shipped photos, batch 8) and on the lab network
   (batch 256): normalized maps on CUDA against the CPU (max |diff|), seconds on each device;
2. filter statistics of the lab network over the MNIST test split on CUDA against the CPU;
3. one training epoch of the default recipe on CUDA (seconds, accuracy after it);
4. activation maximization sweep (80 images) on CUDA vs CPU seconds.
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
    ap.add_argument("--quick", action="store_true", help="fewer methods and images")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    from convlens.attribution import METHODS
    from convlens.data import load_mnist
    from convlens.data.images import open_image, sample_photo_paths
    from convlens.models import load_model
    from convlens.training import make_recipe, train

    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(report, flush=True)
    methods = list(METHODS)
    if a.quick:
        methods = [m for m in methods if m in ("gradcam", "guided-backprop", "integrated-gradients", "scorecam")]

    lite_cpu, lite_gpu = load_model("efficientnet-lite0"), load_model("efficientnet-lite0", device="cuda")
    photos = sample_photo_paths()[:8]
    x = torch.stack([lite_cpu.preprocess(open_image(p)) for p in photos])
    slow_on_cpu = {"scorecam", "ablation-cam", "ss-cam", "is-cam", "kernel-shap", "shapley-sampling", "lime"}
    report["lite0"] = attribution_check(lite_cpu, lite_gpu, x[:2], [m for m in methods if m in slow_on_cpu], "lite0")
    report["lite0"].update(attribution_check(lite_cpu, lite_gpu, x, [m for m in methods if m not in slow_on_cpu],
                                             "lite0"))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = train(tmp, make_recipe("best", epochs=1), seed=0, progress=False, device="cuda")
        report["train_one_epoch_cuda"] = {"seconds": time.perf_counter() - start,
                                          "test_accuracy": metrics["test_accuracy"]}
        print("train 1 epoch on cuda", report["train_one_epoch_cuda"], flush=True)
        lab_cpu, lab_gpu = load_model(tmp), load_model(tmp, device="cuda")
        xt, yt = load_mnist("test").tensors()
        report["labnet"] = attribution_check(lab_cpu, lab_gpu, xt[:256], methods, "labnet")

        from convlens import stats
        layers = ["l1", "l2", "l3"]
        s_cpu, t_cpu = timed(lambda: stats.collect(lab_cpu.model, stats.tensor_batches(xt, yt, 500), layers, 10), 1)
        s_gpu, t_gpu = timed(lambda: stats.collect(lab_gpu.model, ((xb.cuda(), yb.cuda()) for xb, yb in
                                                                  stats.tensor_batches(xt, yt, 500)), layers, 10), 3)
        diffs = {}
        for layer in layers:
            c, g = s_cpu.layer(layer), s_gpu.layer(layer)
            diffs[layer] = {"counts_equal": bool((c["count"] == g["count"]).all()),
                            "mean_map_rel": float(abs(c["mean_map"] - g["mean_map"]).max() / max(abs(c["mean_map"]).max(), 1e-12)),
                            "rank_equal": bool((c["rank"] == g["rank"]).all())}
        report["stats"] = {"cpu_s": t_cpu, "cuda_s": t_gpu, "layers": diffs}
        print("stats", report["stats"], flush=True)

        from convlens.featvis.objectives import class_logit
        from convlens.featvis.optimize import ActMaxConfig, maximize
        objs = [class_logit(c) for _ in range(8) for c in range(10)]
        cfg = ActMaxConfig(tv_weight=[2.0] * 80, progress=False)
        _, am_cpu = timed(lambda: maximize(lab_cpu.model, objs, (1, 28, 28), cfg), 1)
        _, am_gpu = timed(lambda: maximize(lab_gpu.model, objs, (1, 28, 28), cfg), 3)
        report["actmax_80"] = {"cpu_s": am_cpu, "cuda_s": am_gpu}
        print("actmax 80 images", report["actmax_80"], flush=True)
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
