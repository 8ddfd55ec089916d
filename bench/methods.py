"""The methods added in issue 14, each timed side by side with its peer on the same batch, same model
objects, in one process: medians, ratio = peer time / convlens time (> 1: convlens faster).

    python bench/methods.py [--threads 2] [--repeats 3] [--lite0-repeats 1] [--only lab|lite0] [--methods a,b]
                            [--default-malloc]

Peers: Captum 0.9.0 (occlusion, feature ablation, Shapley sampling, KernelSHAP, LIME, DeepLIFT,
GradientSHAP, LRP, NoiseTunnel) and TorchCAM 0.5.0 (Grad-CAM, SmoothGrad-CAM++, SS-CAM, IS-CAM), both
installed with --no-deps. "gradcam (auto layer)" is the functional call `attribute("gradcam", model, x,
target)`: a new method each call, with the automatic layer (TorchCAM is given the layer).
Settings are matched where the definitions match (same windows, features, permutations, samples);
TorchCAM's SS-CAM / IS-CAM weigh channels differently (softmax over channels), so those rows time the
same number of masked forwards, not the same numbers. Methods without an importable peer (HiResCAM,
EigenCAM, Ablation-CAM, FullGrad, RISE…: pytorch-grad-cam imports torchvision) are timed alone.
KernelSHAP / LIME: Captum evaluates as many coalitions as convlens (its sampler, its full and empty
coalitions included), all of one image in one forward (perturbations_per_eval = n_samples, its fastest
setting); LIME with the same kernel (cosine distance of the binary vectors, width 0.25) and Ridge(α = 1).
Lab network: convlens.models.LabNet built untrained, batch of the first 256 MNIST test digits (their
black background equals the baseline, so perturbation copies that change nothing are skipped).
EfficientNet-Lite0: batch 8 photos.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import torch  # noqa: E402

from common import interleaved, setup  # noqa: E402
from convlens.attribution import make_method  # noqa: E402
from convlens.attribution.segment import grid_labels  # noqa: E402
from convlens.models.labnet import LabNet  # noqa: E402


def lab_case():
    from convlens.data import load_mnist

    torch.manual_seed(0)
    model = LabNet().eval()
    x = load_mnist("test").tensors()[0][:256]  # real digits: 81 % of the pixels equal the baseline 0
    return "lab network, batch 256 MNIST digits", model, x, "l3", dict(window=4, stride=4, cells=4, perms=2, samples=8,
                                                          masks=64, channels=None)


def lite0_case():
    from attribution import photo_batch  # bench/attribution.py
    from convlens.models import load_model

    loaded = load_model("efficientnet-lite0")
    return "EfficientNet-Lite0, batch 8", loaded.model.eval(), photo_batch(loaded, 8), None, \
        dict(window=56, stride=56, cells=2, perms=1, samples=4, masks=16, channels=16)


def rows(model, x, layer, s):
    """(name, convlens thunk, peer name, peer thunk or None)."""
    import captum.attr as ca
    from captum.attr._utils import lrp_rules

    with torch.no_grad():
        target = model(x).argmax(1)
    labels = grid_labels(len(x), x.shape[-2], x.shape[-1], s["cells"])
    mask = labels[:, None].expand_as(x).contiguous()
    c = x.shape[1]
    out = []

    def ours(name, **kw):
        method = make_method(name, model, **kw)
        return lambda: method.attribute(x, target)

    out.append(("occlusion", ours("occlusion", window=s["window"], stride=s["stride"], batch_size=256),
                "Captum Occlusion", lambda: ca.Occlusion(model).attribute(
                    x, sliding_window_shapes=(c, s["window"], s["window"]), strides=(c, s["stride"], s["stride"]),
                    baselines=0.0, target=target, perturbations_per_eval=max(1, 256 // len(x)))))
    out.append(("feature-ablation", ours("feature-ablation", cells=s["cells"], batch_size=256),
                "Captum FeatureAblation", lambda: ca.FeatureAblation(model).attribute(
                    x, baselines=0.0, target=target, feature_mask=mask,
                    perturbations_per_eval=max(1, 256 // len(x)))))
    out.append(("shapley-sampling", ours("shapley-sampling", cells=s["cells"], permutations=s["perms"],
                                         batch_size=256),
                "Captum ShapleyValueSampling", lambda: ca.ShapleyValueSampling(model).attribute(
                    x, baselines=0.0, target=target, feature_mask=mask, n_samples=s["perms"],
                    perturbations_per_eval=max(1, 256 // len(x)))))
    out += kernel_shap_and_lime_rows(model, x, s, target, mask, ours)
    out.append(("deeplift", ours("deeplift"), "Captum DeepLift",
                lambda: ca.DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=target)))
    out.append(("gradient-shap", ours("gradient-shap", samples=s["samples"], sigma=0.0),
                "Captum GradientShap", lambda: ca.GradientShap(model).attribute(
                    x, baselines=torch.zeros_like(x[:1]), target=target, n_samples=s["samples"], stdevs=0.0)))

    def captum_lrp():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.rule = lrp_rules.EpsilonRule(epsilon=0.25)
        try:
            return ca.LRP(model).attribute(x, target=target)
        finally:
            for m in model.modules():
                m.__dict__.pop("rule", None)
    out.append(("lrp (epsilon)", ours("lrp", rule="epsilon"), "Captum LRP", captum_lrp))
    out.append(("smoothgrad-sq", ours("smoothgrad-sq", samples=s["samples"]), "Captum NoiseTunnel",
                lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
                    x, nt_type="smoothgrad_sq", nt_samples=s["samples"], stdevs=0.15, target=target, abs=False)))
    out.append(("vargrad", ours("vargrad", samples=s["samples"]), "Captum NoiseTunnel",
                lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
                    x, nt_type="vargrad", nt_samples=s["samples"], stdevs=0.15, target=target, abs=False)))
    out += torchcam_rows(model, x, layer, s, target, ours)
    for name, kw in (("hirescam", {}), ("gradcam-elementwise", {}), ("eigencam", {}), ("eigengradcam", {}),
                     ("ablationcam", {"max_channels": s["channels"]}), ("fullgrad", {}), ("fusedcam", {}),
                     ("rise", {"masks": s["masks"], "batch_size": 256})):
        if layer is not None and name not in ("fullgrad", "fusedcam", "rise"):
            kw = {**kw, "layer": layer}
        out.append((name, ours(name, **kw), None, None))
    return out


def kernel_shap_and_lime_rows(model, x, s, target, mask, ours):
    """KernelSHAP and LIME on a grid of cells², as many model evaluations on both sides."""
    import captum.attr as ca
    from captum._utils.models.linear_model import SkLearnRidge
    from test_kernelshap_lime import lime_kernel

    samples, features = s["samples"] * 4, s["cells"] ** 2
    coalitions = min(samples, 2 ** features - 2)  # convlens enumerates all when they are this few
    lime = ca.Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel(0.25))
    # convlens at its default batch size (auto_batch_size): on EfficientNet-Lite0 a batch_size of 256 makes one
    # forward of all 120 copies, slower per image on 1–2 threads than batches of 8–16
    return [("kernel-shap", ours("kernel-shap", cells=s["cells"], samples=samples),
             "Captum KernelShap", lambda: ca.KernelShap(model).attribute(
                 x, baselines=0.0, target=target, feature_mask=mask, n_samples=coalitions + 2,
                 perturbations_per_eval=coalitions + 2)),
            ("lime", ours("lime", features="grid", cells=s["cells"], samples=samples),
             "Captum Lime", lambda: lime.attribute(x, baselines=0.0, target=target, feature_mask=mask,
                                                   n_samples=samples, perturbations_per_eval=samples))]


def torchcam_rows(model, x, layer, s, target, ours):
    try:
        import torchcam.methods as tc
    except ImportError:
        return []
    from convlens.hooks import auto_layer

    layer = layer or auto_layer(model, x)
    shape = tuple(x.shape[1:])
    classes = target.tolist()

    def run(cls, **kw):
        def thunk():
            with cls(model, layer, input_shape=shape, **kw) as extractor:
                extractor(classes, model(x))
        return thunk
    def gradcam_functional():  # as `attribute("gradcam", model, x, target)` runs: a new method each call
        return make_method("gradcam", model).attribute(x, target)
    out = [("gradcam", ours("gradcam", layer=layer), "TorchCAM GradCAM", run(tc.GradCAM)),
           ("gradcam (auto layer)", gradcam_functional, "TorchCAM GradCAM", run(tc.GradCAM)),
           ("smoothgradcam++", ours("smoothgradcam++", layer=layer, samples=s["samples"]),
            "TorchCAM SmoothGradCAMpp", run(tc.SmoothGradCAMpp, num_samples=s["samples"], std=0.15))]
    for name, cls in (("sscam", tc.SSCAM), ("iscam", tc.ISCAM)):
        mine = ours(name, layer=layer, samples=2, batch_size=64, max_channels=s["channels"])
        if s["channels"] is None:  # TorchCAM scores every channel: compared only where convlens does too
            out.append((name, mine, f"TorchCAM {cls.__name__}", run(cls, num_samples=2, batch_size=64)))
        else:
            out.append((name, mine, None, None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lite0-repeats", type=int, default=1)
    parser.add_argument("--only", choices=["lab", "lite0"])
    parser.add_argument("--methods", help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (a Python API user's setting; default: the CLI's tuning)")
    args = parser.parse_args()
    setup(args.threads, malloc=not args.default_malloc)
    warnings.simplefilter("ignore")
    cases = [(lab_case, args.repeats), (lite0_case, args.lite0_repeats)]
    for make_case, repeats in cases:
        title, model, x, layer, settings = make_case()
        if args.only and args.only not in title.lower().replace("efficientnet-", ""):
            continue
        malloc = "default malloc" if args.default_malloc else "tuned malloc"
        print(f"\n== {title} (medians of {repeats}, threads {args.threads}, {malloc})")
        print(f"{'method':22s} {'convlens s':>11s} {'peer s':>9s} {'ratio':>7s}  peer")
        for name, mine, peer_name, peer in rows(model, x, layer, settings):
            if args.methods and name.split(" ")[0] not in args.methods.split(","):
                continue
            if peer is not None:
                try:
                    peer()  # also the warm-up
                except Exception as exc:  # a peer that cannot run this model: say so, time convlens alone
                    peer_name, peer = f"{peer_name} failed: {type(exc).__name__}: {str(exc)[:60]!r}", None
            fns = {"mine": mine} if peer is None else {"mine": mine, "peer": peer}
            t = interleaved(fns, repeats=repeats, warmup=1 if repeats > 1 else 0)
            if peer is None and peer_name:
                print(f"{name:22s} {t['mine']:11.3f} {'-':>9s} {'-':>7s}  {peer_name}")
            elif peer is None:
                print(f"{name:22s} {t['mine']:11.3f} {'-':>9s} {'-':>7s}  (no importable peer)")
            else:
                print(f"{name:22s} {t['mine']:11.3f} {t['peer']:9.3f} {t['peer'] / t['mine']:7.2f}  {peer_name}")


if __name__ == "__main__":
    main()
