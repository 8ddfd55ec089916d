"""Deletion / insertion curves (Petsiuk et al. 2018, RISE) and Average Drop / Increase in Confidence
(Chattopadhay et al. 2018), batched over images and perturbation steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..baselines import make_baseline
from ..errors import ConvlensError
from ..hooks import evaluating
from ..runtime import channels_last, channels_last_weights


def auc(curve: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """Trapezoidal area Σ_s (f_{s+1} − f_s)(c_s + c_{s+1})/2 under curves (last axis) sampled at
    ``fractions`` (evenly spaced 0…1 when None)."""
    n = curve.shape[-1]
    if n < 2:
        raise ConvlensError("a curve needs at least two points")
    if fractions is None:
        fractions = torch.linspace(0, 1, n, dtype=curve.dtype)
    if fractions.shape[-1] != n:
        raise ConvlensError(f"{fractions.shape[-1]} fractions for curves of {n} points")
    widths = (fractions[1:] - fractions[:-1]).to(curve)
    return ((curve[..., 1:] + curve[..., :-1]) * widths).sum(-1) / 2


@dataclass
class Curves:
    deletion: torch.Tensor   # (N, steps + 1) target probability
    insertion: torch.Tensor  # (N, steps + 1)
    fractions: torch.Tensor  # (steps + 1,)

    @property
    def deletion_auc(self) -> torch.Tensor:
        return auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> torch.Tensor:
        return auc(self.insertion, self.fractions)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel (0 = most important), ties broken by position: (N, H·W)."""
    order = torch.argsort(-maps.flatten(1), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                       steps: int = 28, deletion_baseline="zero", insertion_baseline="blur",
                       batch_size: int = 256) -> Curves:
    """Target probability as the most important pixels are removed (deletion) or revealed (insertion).

    Step t changes the round(t·H·W/steps) most important pixels (all channels of a pixel); the AUCs
    integrate over these actual fractions, which are uneven when H·W is not a multiple of ``steps``.
    """
    if maps.shape[0] != x.shape[0] or maps.shape[-2:] != x.shape[-2:]:
        raise ConvlensError(f"maps {tuple(maps.shape)} do not match inputs {tuple(x.shape)}")
    n, _, h, w = x.shape
    ranks = pixel_ranks(maps.to(x.device)).view(n, 1, h, w)
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long().to(x.device)
    del_base, ins_base = make_baseline(x, deletion_baseline), make_baseline(x, insertion_baseline)
    t = targets.to(x.device).long()
    with channels_last_weights(model), evaluating(model):
        curves = {name: perturbed_probabilities(model, start, end, ranks, counts, t, batch_size)
                  for name, start, end in (("deletion", x, del_base), ("insertion", ins_base, x))}
    return Curves(curves["deletion"], curves["insertion"], counts.float().cpu() / (h * w))


def perturbed_probabilities(model: nn.Module, start: torch.Tensor, end: torch.Tensor, ranks: torch.Tensor,
                            counts: torch.Tensor, t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, steps + 1) target probability when the ``counts[s]`` top-ranked pixels of ``start`` come from ``end``."""
    n = start.shape[0]
    probs = torch.empty(len(counts), n)
    per_chunk = max(1, batch_size // n)
    for s0 in range(0, len(counts), per_chunk):
        cnt = counts[s0:s0 + per_chunk]
        changed = ranks[None] < cnt.view(-1, 1, 1, 1, 1)  # (k, N, 1, H, W)
        batch = torch.where(changed, end[None], start[None]).flatten(0, 1)
        p = F.softmax(model(channels_last(batch)), dim=1).view(len(cnt), n, -1)
        probs[s0:s0 + len(cnt)] = p.gather(2, t.view(1, n, 1).expand(len(cnt), n, 1))[..., 0].cpu()
    return probs.t().contiguous()


@torch.no_grad()
def average_drop_increase(model: nn.Module, x: torch.Tensor, normalized_maps: torch.Tensor,
                          targets: torch.Tensor) -> dict[str, float | list[float]]:
    """Average Drop = mean(max(0, Y − O)/Y)·100 and Increase in Confidence = mean(O > Y)·100, where Y is
    the target probability on the image and O on the image multiplied by its [0, 1] map."""
    t = targets.to(x.device).long().view(-1, 1)
    with evaluating(model):
        y = F.softmax(model(x), 1).gather(1, t)[:, 0]
        o = F.softmax(model(x * normalized_maps[:, None].to(x)), 1).gather(1, t)[:, 0]
    drop = (F.relu(y - o) / y.clamp_min(1e-12)) * 100
    return {"average_drop": float(drop.mean()), "increase_in_confidence": float((o > y).float().mean() * 100),
            "per_image_drop": drop.tolist(), "per_image_increase": (o > y).tolist()}
