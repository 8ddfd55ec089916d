"""ONNX import on EfficientNet-Lite0: load time, and the converted model's forward and Grad-CAM
against the native torch model and ONNX Runtime (same inputs, medians of interleaved runs).

    python bench/onnx_import.py [--threads 2] [--repeats 5] [--batch 8]

Needs the onnx extra and onnxruntime (the test extra).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402

from common import interleaved, setup  # noqa: E402
from convlens.attribution import make_method  # noqa: E402
from convlens.models import efficientnet_lite0  # noqa: E402
from convlens.models.onnx_import import load_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    setup(args.threads)
    import onnxruntime as ort

    native = efficientnet_lite0().eval()
    x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "lite0.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(native, (x[:1],), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}})
        start = time.perf_counter()
        model = load_onnx(path)
        load_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    print(f"load_onnx: {load_s:.2f} s, {len(list(model.children()))} modules")

    def forward(m):
        with torch.no_grad():
            return m(x)
    times = interleaved({"native": lambda: forward(native), "onnx": lambda: forward(model),
                         "onnxruntime": lambda: session.run(None, {"x": x.numpy()})}, repeats=args.repeats)
    print(f"forward, batch {args.batch}: native {times['native']:.3f} s, converted {times['onnx']:.3f} s, "
          f"onnxruntime {times['onnxruntime']:.3f} s; converted / native = {times['onnx'] / times['native']:.2f}")

    cams = {"native": make_method("gradcam", native, layer="_head_act"),
            "onnx": make_method("gradcam", model, layer="head_act_Clip")}
    times = interleaved({name: lambda m=m: m.attribute(x) for name, m in cams.items()}, repeats=args.repeats)
    print(f"Grad-CAM, batch {args.batch}: native {times['native']:.3f} s, converted {times['onnx']:.3f} s; "
          f"converted / native = {times['onnx'] / times['native']:.2f}")


if __name__ == "__main__":
    main()
