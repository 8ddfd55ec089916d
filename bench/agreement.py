"""Agreement of the issue-14 methods with their peers: max |convlens − peer| on the same inputs.

    python bench/agreement.py

Small conv nets from the tests (ReLU modules, as Captum needs them), float32, one process. The
tests assert these within tolerances; this prints the numbers for the closing note.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import torch  # noqa: E402

from convlens.attribution import attribute, make_method  # noqa: E402
from convlens.attribution.segment import grid_labels  # noqa: E402


def kernel_shap_and_lime_rows(ca, net, x, t) -> list:
    """KernelSHAP and LIME against Captum's KernelShap and Lime fed the same coalitions (its sampler draws
    from the global RNG one coalition at a time), as in tests/test_kernelshap_lime.py."""
    from test_kernelshap_lime import captum_feature_mask, every_coalition, feeding, lime_kernel, shapley_kernel
    from captum._utils.models.linear_model import SkLearnRidge
    from convlens.attribution.perturbation import KernelSHAP

    rows = []
    labels = grid_labels(3, 12, 12, 3)
    captum = ca.KernelShap(net)
    captum.perturb_func = feeding(every_coalition(9), ends=True)
    captum.similarity_func = shapley_kernel(9, captum.inf_weight)
    ref = captum.attribute(x, baselines=0.2, target=t, feature_mask=captum_feature_mask(labels, x), n_samples=512,
                           perturbations_per_eval=64)
    ours = attribute("kernel-shap", net, x, target=t, cells=3, samples=510, baseline=0.2)
    rows.append(("kernel-shap (all 510)", "Captum KernelShap, fed them", ours.raw, ref[:, 0]))
    labels = grid_labels(3, 12, 12, 4)
    captum = ca.KernelShap(net)
    captum.perturb_func = feeding(KernelSHAP(net, samples=200).coalitions(16, "cpu")[0], ends=True)
    ref = captum.attribute(x, baselines=0.0, target=t, feature_mask=captum_feature_mask(labels, x), n_samples=202,
                           perturbations_per_eval=64)
    ours = attribute("kernel-shap", net, x, target=t, cells=4, samples=200)
    rows.append(("kernel-shap (200 draws)", "Captum KernelShap, same draws", ours.raw, ref[:, 0]))
    method = make_method("lime", net, features="slic", segments=6, samples=48, kernel_width=0.5, baseline=0.1)
    labels = method.labels(x)
    refs = []
    for n in range(len(x)):
        lime = ca.Lime(net, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel(0.5),
                       perturb_func=feeding(method.coalitions(int(labels[n].max()) + 1, "cpu"), ends=False))
        refs.append(lime.attribute(x[n:n + 1], baselines=0.1, target=t[n], n_samples=48,
                                   feature_mask=captum_feature_mask(labels[n:n + 1], x[n:n + 1]))[0, 0])
    rows.append(("lime (slic, ridge 1)", "Captum Lime, same samples", method.attribute(x, t).raw, torch.stack(refs)))
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    import captum.attr as ca
    from captum.attr._utils import lrp_rules
    from test_backprop_rules import ReluNet
    from test_lrp import PlainNet
    from test_perturbation import SmallNet

    rows = []
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    t = [0, 3, 1]
    net = SmallNet().eval()
    ref = ca.Occlusion(net).attribute(x, sliding_window_shapes=(3, 5, 5), strides=(3, 3, 3), baselines=0.2, target=t)
    ours = attribute("occlusion", net, x, target=t, window=5, stride=3, baseline=0.2)
    rows.append(("occlusion", "Captum Occlusion", ours.raw, ref[:, 0]))
    method = make_method("feature-ablation", net, features="slic", segments=6, baseline=0.1)
    labels = method.labels(x)
    ref = ca.FeatureAblation(net).attribute(x, baselines=0.1, target=t, feature_mask=labels[:, None].expand_as(x))
    rows.append(("feature-ablation (slic)", "Captum FeatureAblation", method.attribute(x, t).raw, ref[:, 0]))
    labels = grid_labels(3, 12, 12, 3)
    torch.manual_seed(5)
    ref = ca.ShapleyValueSampling(net).attribute(x, baselines=0.0, target=t, n_samples=3,
                                                 feature_mask=labels[:, None].expand_as(x).contiguous())
    ours = attribute("shapley-sampling", net, x, target=t, cells=3, permutations=3, seed=5)
    rows.append(("shapley-sampling", "Captum ShapleyValueSampling", ours.raw, ref[:, 0]))
    rows += kernel_shap_and_lime_rows(ca, net, x, t)

    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    t = [0, 3, 2]
    base = torch.full_like(x, 0.1)
    ours = attribute("deeplift", ReluNet(relu6=False).eval(), x, target=t, baseline=base)
    ref = ca.DeepLift(ReluNet(relu6=False).eval()).attribute(x, baselines=base, target=t)
    rows.append(("deeplift", "Captum DeepLift", ours.raw, ref))

    x = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(9))
    t = [1, 0, 3]
    for ours_rule, make in (("epsilon", lambda: lrp_rules.EpsilonRule(epsilon=0.1)),
                            ("gamma", lambda: lrp_rules.GammaRule(gamma=0.3)),
                            ("alpha1beta0", lrp_rules.Alpha1_Beta0_Rule)):
        ref_net = PlainNet(bias=False).eval()
        dense = "epsilon" if ours_rule == "gamma" else ours_rule  # γ on the convolutions (as tested)
        for name in ("conv1", "conv2"):
            getattr(ref_net, name).rule = make()
        for name in ("fc1", "fc2"):
            getattr(ref_net, name).rule = lrp_rules.EpsilonRule(epsilon=0.1) if dense == "epsilon" else make()
        ref = ca.LRP(ref_net).attribute(x, target=t)
        ours = attribute("lrp", PlainNet(bias=False).eval(), x, target=t, composite={"Conv2d": ours_rule,
                         "Linear": dense}, epsilon=0.1, gamma=0.3, stabilizer=1e-9)
        rows.append((f"lrp {ours_rule}" + (" (conv) + epsilon" if ours_rule == "gamma" else ""), "Captum LRP",
                     ours.raw, ref))
    net = PlainNet().eval()
    rows.append(("lrp zero", "input × gradient", attribute("lrp", net, x - 0.5, t, rule="zero").raw,
                 attribute("input-x-gradient", net, x - 0.5, t).raw))

    print(f"{'method':26s} {'reference':32s} {'max |diff|':>11s} {'max |ref|':>10s}")
    for name, peer, a, b in rows:
        print(f"{name:26s} {peer:32s} {float((a - b).abs().max()):11.2e} {float(b.abs().max()):10.2e}")


if __name__ == "__main__":
    main()
