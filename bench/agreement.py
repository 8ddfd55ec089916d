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

    print(f"{'method':26s} {'reference':30s} {'max |diff|':>11s} {'max |ref|':>10s}")
    for name, peer, a, b in rows:
        print(f"{name:26s} {peer:30s} {float((a - b).abs().max()):11.2e} {float(b.abs().max()):10.2e}")


if __name__ == "__main__":
    main()
