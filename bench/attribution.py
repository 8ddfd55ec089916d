"""Attribution speed on EfficientNet-Lite0, batch of 8 photos: convlens vs Captum vs hand-written hooks,
and Score-CAM's batched masked forwards vs one mask at a time. Ratios within one run.

    python bench/attribution.py [--threads 2] [--repeats 5] [--no-scorecam]

Captum is a bench/test-only dependency (`pip install --no-deps captum`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import interleaved, setup  # noqa: E402
from convlens.attribution import make_method, normalize_maps  # noqa: E402
from convlens.attribution.cam import ScoreCAM  # noqa: E402
from convlens.data.images import open_image, sample_photo_paths  # noqa: E402
from convlens.models import load_model  # noqa: E402


def photo_batch(loaded, n: int = 8) -> torch.Tensor:
    xs = [loaded.preprocess(open_image(p)) for p in sample_photo_paths()]
    while len(xs) < n:
        xs.append(xs[len(xs) % 6].flip(-1))
    return torch.stack(xs[:n])


def handwritten_gradcam(model, layer, x, target):
    store = {}

    def keep(_module, _inputs, output):
        store["a"] = output
        output.register_hook(lambda g: store.__setitem__("g", g))
    h = layer.register_forward_hook(keep)
    try:
        out = model(x)
        model.zero_grad()
        out.gather(1, target[:, None]).sum().backward()
    finally:
        h.remove()
    weights = store["g"].mean((2, 3), keepdim=True)
    return F.relu((weights * store["a"]).sum(1)).detach()


def handwritten_guided(model, x, target):
    handles = []

    def rule(module, grad_in, grad_out):
        return (grad_in[0].clamp_min(0),)
    for m in model.modules():
        if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6)):
            handles.append(m.register_full_backward_hook(rule))
    try:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        grad = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)[0]
    finally:
        for h in handles:
            h.remove()
    return grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-scorecam", action="store_true")
    args = ap.parse_args()
    setup(args.threads)
    from captum.attr import GuidedBackprop, LayerGradCam

    loaded = load_model("efficientnet-lite0")
    model = loaded.model
    x = photo_batch(loaded)
    with torch.no_grad():
        target = model(x).argmax(1)
    ours_cam = make_method("gradcam", model)
    ours_gb = make_method("guided-backprop", model)
    ours_sal = make_method("saliency", model)
    captum_cam = LayerGradCam(model, model._head_act)
    captum_gb = GuidedBackprop(model)

    t = interleaved({
        "convlens gradcam": lambda: ours_cam.attribute(x, target),
        "convlens gradcam (predict)": lambda: ours_cam.attribute(x),
        "captum LayerGradCam": lambda: captum_cam.attribute(x, target=target),
        "hand-written gradcam": lambda: handwritten_gradcam(model, model._head_act, x, target),
        "convlens guided-backprop": lambda: ours_gb.attribute(x, target),
        "captum GuidedBackprop": lambda: captum_gb.attribute(x.clone().requires_grad_(True), target=target),
        "hand-written guided": lambda: handwritten_guided(model, x, target),
    }, repeats=args.repeats)
    print(f"EfficientNet-Lite0, batch {len(x)}, {args.threads} threads, medians of {args.repeats}")
    for name, v in t.items():
        print(f"  {name:<28}{v:.3f} s")
    best_cam = min(t["captum LayerGradCam"], t["hand-written gradcam"])
    best_gb = min(t["captum GuidedBackprop"], t["hand-written guided"])
    print(f"Grad-CAM ratio vs fastest other: {t['convlens gradcam'] / best_cam:.2f} (target ≤ 1.0)")
    print(f"guided backprop ratio vs fastest other: {t['convlens guided-backprop'] / best_gb:.2f} (target ≤ 1.0)")

    ours = normalize_maps(ours_cam.attribute(x, target).raw)
    theirs = normalize_maps(captum_cam.attribute(x, target=target, relu_attributions=True).detach()[:, 0])
    print(f"Grad-CAM agreement with Captum (max |Δ| after normalization): {float((ours - theirs).abs().max()):.2e}")
    sal = ours_sal.attribute(x, target).raw
    cap_gb = captum_gb.attribute(x.clone().requires_grad_(True), target=target).detach()
    ours_gb_raw = ours_gb.attribute(x, target).raw
    print(f"Captum GuidedBackprop vs vanilla gradient on this ReLU6 network: max |Δ| "
          f"{float((cap_gb - sal).abs().max()):.2e} (it ignores ReLU6); convlens guided vs vanilla: "
          f"{float((ours_gb_raw - sal).abs().max()):.2e}")
    hand_gb = handwritten_guided(model, x, target)
    print(f"convlens guided backprop vs a hand-written guided rule (full backward hooks on ReLU and ReLU6): "
          f"max |Δ| {float((ours_gb_raw - hand_gb).abs().max()):.2e}")

    if not args.no_scorecam:
        one = x[2:3]
        start = time.perf_counter()
        ScoreCAM(model).attribute(one)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        ScoreCAM(model, batch_size=1).attribute(one)
        single = time.perf_counter() - start
        print(f"Score-CAM (chelsea, all live channels): batched (8) {batched:.1f} s, one mask at a time "
              f"{single:.1f} s → {single / batched:.2f}× (target ≥ 2×)")


if __name__ == "__main__":
    main()
