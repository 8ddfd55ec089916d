"""An independent judge of activation-maximization images: does a person's digit come out?

The judge is two small classifiers of shapes different from the explained network — a CNN with
strided convolutions and no max-pooling, and a one-hidden-layer MLP — trained once together on
the same MNIST training set with a fixed seed and cached (see ``cached.py``). An image is
*recognized* when both put the target first (pairs: both targets in both top twos); its judge
probability is the lower of the two. One lenient classifier alone accepts stroke textures that a
person does not read as digits; the MLP, which has no notion of local strokes, rarely does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cached import cached_network

JUDGE_VERSION = "v2-strided16-32-64+mlp128-e3-seed0"
CLASSIFIERS = ("cnn", "mlp")


class JudgeNet(nn.Module):
    """CNN: conv 16 (3×3, stride 2) → conv 32 (3×3, stride 2) → dense 64 → 10; MLP: 784 → 128 → 10.
    Inputs in [0, 1]; returns the logits of both, shape (2, B, 10)."""

    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.1307) / 0.3081
        return torch.stack([self.cnn(x), self.mlp(x)])


def fit_judge(net: nn.Module, epochs: int = 3, batch: int = 128, seed: int = 0) -> dict:
    """Adam with a cosine-decayed learning rate (the CNN on lightly augmented batches, the MLP on the
    originals); returns both test accuracies."""
    from ..data.mnist import load_mnist
    from ..training import random_affine

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_mnist("train").tensors()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = epochs * math.ceil(len(x) / batch)
    net.train()
    for step in range(steps):
        if step % math.ceil(len(x) / batch) == 0:
            perm = torch.randperm(len(x), generator=gen)
        i = step % math.ceil(len(x) / batch)
        idx = perm[i * batch:(i + 1) * batch]
        xb = random_affine(x[idx], gen, rotate_deg=8.0, scale=0.08, shift_px=2.0)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net(xb)[0], y[idx]) + F.cross_entropy(net(x[idx])[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = load_mnist("test").tensors()
    with torch.no_grad():
        cnn, mlp = ((logits.argmax(1) == yt).float().mean().item() for logits in net(xt))
    return {"test_accuracy": {"cnn": cnn, "mlp": mlp}, "epochs": epochs, "seed": seed,
            "architecture": JudgeNet.__doc__}


def load_judge(folder=None) -> tuple[nn.Module, dict]:
    """The cached judge (trained on first use, under a minute on one core)."""
    return cached_network("mnist-judge", JUDGE_VERSION, JudgeNet, fit_judge, folder)


@dataclass
class Verdict:
    recognized: list[bool]        # per image: both classifiers' top class (top two, for pairs) are the targets
    probabilities: list[float]    # per image: the lowest probability of a target over targets and classifiers
    top: list[list[int]]          # per image: the CNN's top classes (as many as targets)
    by_classifier: list[dict[str, bool]] = None  # per image: {"cnn": …, "mlp": …} each classifier's verdict
    top_by_classifier: list[dict[str, list[int]]] = None  # per image: {"cnn": top classes, "mlp": top classes}

    @property
    def count(self) -> int:
        return sum(self.recognized)

    @property
    def mean_probability(self) -> float:
        return sum(self.probabilities) / max(1, len(self.probabilities))


@torch.no_grad()
def judge_images(judge: nn.Module, images01: torch.Tensor, targets: list[list[int]]) -> Verdict:
    """Judge images given in [0, 1] (black background, like MNIST) against their target class(es)."""
    probs = judge(images01.detach().float().cpu()).softmax(2)  # (judges, B, classes)
    recognized, target_probs, tops, each, tops_each = [], [], [], [], []
    for i, tgt in enumerate(targets):
        top = [probs[j, i].topk(len(tgt)).indices.tolist() for j in range(len(probs))]
        tops.append(top[0])
        tops_each.append(dict(zip(CLASSIFIERS, top)))
        each.append({name: sorted(t) == sorted(tgt) for name, t in zip(CLASSIFIERS, top)})
        recognized.append(all(each[-1].values()))
        target_probs.append(min(float(probs[j, i, t]) for j in range(len(probs)) for t in tgt))
    return Verdict(recognized, target_probs, tops, each, tops_each)
