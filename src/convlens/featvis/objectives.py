"""Objectives to maximize, composable with ``+``, ``-`` and scalar ``*``.

An objective maps the captured outputs ``{"": logits, "<layer>": activations}`` of a
batch to one value per sample. Objectives are immutable: ``a + b`` builds a new objective
and never changes ``a`` or ``b``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..errors import ConvlensError

LOGITS = ""
Outputs = dict[str, torch.Tensor]


class Objective:
    """A per-sample quantity to maximize; ``layers`` lists the module paths it reads ('' = logits)."""

    __slots__ = ("fn", "layers", "description", "linear")

    def __init__(self, fn: Callable[[Outputs], torch.Tensor], layers: frozenset[str], description: str,
                 linear: dict[int, float] | None = None):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "layers", frozenset(layers))
        object.__setattr__(self, "description", description)
        # {class: coefficient} when the objective is a linear combination of logits (a fast path)
        object.__setattr__(self, "linear", linear)

    def __setattr__(self, *_):
        raise AttributeError("objectives are immutable")

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        return self.fn(outputs)

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        a, b = self.fn, other.fn
        return Objective(lambda o: a(o) + b(o), self.layers | other.layers, f"{self} + {other}",
                         combine_linear(self.linear, other.linear, 1.0))

    def __sub__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        a, b = self.fn, other.fn
        return Objective(lambda o: a(o) - b(o), self.layers | other.layers, f"{self} - ({other})",
                         combine_linear(self.linear, other.linear, -1.0))

    def __mul__(self, scale: float) -> "Objective":
        if isinstance(scale, Objective) or not isinstance(scale, (int, float)):
            return NotImplemented
        if not math.isfinite(scale):
            raise ConvlensError(f"objective scale must be finite, got {scale}")
        a = self.fn
        linear = None if self.linear is None else {c: scale * w for c, w in self.linear.items()}
        return Objective(lambda o: scale * a(o), self.layers, f"{scale:g}·({self})", linear)

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __repr__(self) -> str:
        return self.description

    __str__ = __repr__

    def __hash__(self) -> int:
        return hash(self.description)

    def __eq__(self, other) -> bool:
        return isinstance(other, Objective) and other.description == self.description


def combine_linear(a: dict | None, b: dict | None, sign: float) -> dict | None:
    if a is None or b is None:
        return None
    out = dict(a)
    for c, w in b.items():
        out[c] = out.get(c, 0.0) + sign * w
    return out


def class_logit(index: int) -> Objective:
    """The pre-softmax score of class ``index`` (a softmax can rise by lowering other classes)."""
    return Objective(lambda o: o[LOGITS][:, index], frozenset({LOGITS}), f"logit[{index}]", {index: 1.0})


def class_log_probability(index: int) -> Objective:
    """log softmax of class ``index``: rises only when the class gains on every other class."""
    return Objective(lambda o: torch.log_softmax(o[LOGITS], dim=1)[:, index], frozenset({LOGITS}),
                     f"logp[{index}]")


def channel(layer: str, index: int) -> Objective:
    """Mean over space of channel ``index`` of ``layer``."""
    def fn(o: Outputs) -> torch.Tensor:
        act = o[layer]
        if act.dim() != 4:
            raise ConvlensError(f"layer {layer!r} has no spatial output; use unit() or a class objective")
        return act[:, index].mean((1, 2))
    return Objective(fn, frozenset({layer}), f"{layer}[{index}]")


def unit(layer: str, index: int, y: int | None = None, x: int | None = None) -> Objective:
    """A single unit: channel ``index`` at (y, x) of a spatial layer, or neuron ``index`` of a dense one."""
    def fn(o: Outputs) -> torch.Tensor:
        act = o[layer]
        if act.dim() == 4:
            yy = act.shape[2] // 2 if y is None else y
            xx = act.shape[3] // 2 if x is None else x
            return act[:, index, yy, xx]
        return act[:, index]
    where = "" if y is None else f",{y},{x}"
    return Objective(fn, frozenset({layer}), f"{layer}[{index}{where}]")


def soft_min(*objectives: Objective, temperature: float = 1.0) -> Objective:
    """A smooth minimum, −T·log Σ exp(−o/T): maximizing it raises every objective, not just the easiest."""
    if not objectives:
        raise ConvlensError("soft_min needs at least one objective")
    fns = [o.fn for o in objectives]

    def fn(o: Outputs) -> torch.Tensor:
        stacked = torch.stack([f(o) for f in fns])
        return -temperature * torch.logsumexp(-stacked / temperature, dim=0)
    layers = frozenset().union(*(o.layers for o in objectives))
    return Objective(fn, layers, "softmin(" + ", ".join(map(str, objectives)) + ")")


def strongest_other_logit(excluded: Sequence[int]) -> Objective:
    """max_{c ∉ excluded} z_c, the highest logit outside ``excluded`` (its gradient reaches that class only)."""
    excluded = sorted({int(c) for c in excluded})
    if not excluded:
        raise ConvlensError("strongest_other_logit needs at least one class to exclude")

    def fn(o: Outputs) -> torch.Tensor:
        z = o[LOGITS]
        keep = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
        keep[excluded] = False
        if not bool(keep.any()):
            raise ConvlensError(f"no class left outside {excluded}")
        return z[:, keep].max(1).values
    return Objective(fn, frozenset({LOGITS}), "max logit outside {" + ", ".join(map(str, excluded)) + "}")
