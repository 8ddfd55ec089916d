"""Layer-wise relevance propagation (Bach et al. 2015; rules as in Montavon et al. 2019).

Relevance R starts as the explained score and flows down; for a linear layer z = W a + b a rule
distributes R_j over its inputs in proportion to modified contributions z'_ij:

* ``zero``:        z' = z (LRP-0; on ReLU networks the result equals gradient × input)
* ``epsilon``:     z' = z, denominator z_j + ε·sign(z_j)
* ``gamma``:       z'_ij = a_i w_ij + γ·(a_i w_ij)^± — contributions of the output's own sign amplified
  (for a ≥ 0 and z_j > 0: W + γW⁺, b + γb⁺, the paper's form; z'_j never crosses zero, as in Zennit)
* ``alpha1beta0`` / ``alpha2beta1``: α·(positive share) − β·(negative share), shares split by the sign
  of each contribution a_i w_ij (bias to its sign's side)
* ``zbox`` (first layer, inputs in [l, h]): z'_ij = a_i w_ij − l_i w⁺_ij − h_i w⁻_ij
* ``flat`` (first layer): every input in the receptive field gets an equal share

Implementation: the gradient trick — each rule rewrites the layer's output to
z + (z' − sg(z'))·sg(z / stab(z')) (sg: stop-gradient) through the hook engine, so the value is the
plain forward and a ⊙ ∂/∂a is the relevance; ReLU-family units pass relevance unchanged (their
backward is y/x through the ReLU-rule engine, which covers functional and in-place ReLUs and ReLU6).
**Canonization:** a BatchNorm whose input is a convolution's output is folded into that convolution
for the duration (the convolution's hook computes with the folded weights, the BatchNorm's returns
its input); no parameter or buffer is modified.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError
from ..hooks import frozen, relu_rule, rewrite_outputs
from .base import Attribution, Method, input_size_errors

LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
RULES = ("zero", "epsilon", "gamma", "alpha1beta0", "alpha2beta1", "zplus", "zbox", "flat")
FIRST_ONLY = ("zbox", "flat")
COMPOSITES: dict[str, dict[str, str]] = {
    "zero": {"Conv2d": "zero", "Linear": "zero"},
    "epsilon": {"Conv2d": "epsilon", "Linear": "epsilon"},
    "epsilon-plus": {"Conv2d": "zplus", "Linear": "epsilon"},
    "epsilon-plus-flat": {"Conv2d": "zplus", "Linear": "epsilon", "first": "flat"},
    "epsilon-gamma-box": {"Conv2d": "gamma", "Linear": "epsilon", "first": "zbox"},
    "epsilon-alpha2-beta1": {"Conv2d": "alpha2beta1", "Linear": "epsilon"},
    "epsilon-alpha2-beta1-flat": {"Conv2d": "alpha2beta1", "Linear": "epsilon", "first": "flat"},
}


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def pass_relevance(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, upper) -> torch.Tensor:
    """ReLU-family unit: R_in = R_out, i.e. ∂ becomes y/x (= the gradient for a plain ReLU)."""
    ratio = y / torch.where(x == 0, torch.ones_like(x), x)
    return grad * torch.where(x == 0, torch.zeros_like(x), ratio)


@dataclass
class LayerParams:
    weight: torch.Tensor
    bias: torch.Tensor


class _Guard:
    """Re-entrancy flag: a rule evaluates the module itself with other parameters, without its hook."""

    active = False


def linear_map(module: nn.Module, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The module's own linear map (padding, stride, groups…) with the given parameters."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    _Guard.active = True
    try:
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (a,))
    finally:
        _Guard.active = False


def trick(z: torch.Tensor, modified: torch.Tensor, eps: float) -> torch.Tensor:
    """(z' − sg(z')) · sg(z / stab(z')): zero in value, the rule's share in the backward."""
    return (modified - modified.detach()) * (z / stabilize(modified, eps)).detach()


def rule_output(rule: str, module, a, z, params: LayerParams, opts: "LRP", aux: dict) -> torch.Tensor:
    w, b = params.weight, params.bias
    zero_b = torch.zeros_like(b)
    if rule in ("zero", "epsilon"):
        eps = opts.epsilon if rule == "epsilon" else 1e-12
        return z.detach() + trick(z, linear_map(module, a, w, b), eps)
    if rule == "gamma":
        g, ap, an = opts.gamma, a.clamp(min=0), a.clamp(max=0)
        wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        pos = linear_map(module, ap, wp, b + g * b.clamp(min=0)) + linear_map(module, an, wn, zero_b)
        neg = linear_map(module, ap, wn, b + g * b.clamp(max=0)) + linear_map(module, an, wp, zero_b)
        return z.detach() + trick(z, torch.where(z.detach() > 0, pos, neg), opts.stabilizer)
    if rule in ("alpha1beta0", "zplus", "alpha2beta1"):
        alpha, beta = (2.0, 1.0) if rule == "alpha2beta1" else (1.0, 0.0)
        wp, wn, ap, an = w.clamp(min=0), w.clamp(max=0), a.clamp(min=0), a.clamp(max=0)
        positive = linear_map(module, ap, wp, b.clamp(min=0)) + linear_map(module, an, wn, zero_b)
        out = z.detach() + alpha * trick(z, positive, opts.stabilizer)
        if beta:
            negative = linear_map(module, ap, wn, b.clamp(max=0)) + linear_map(module, an, wp, zero_b)
            out = out - beta * trick(z, negative, opts.stabilizer)
        return out
    if rule == "zbox":
        low, high = opts.box_bounds(a)
        low, high = low.requires_grad_(True), high.requires_grad_(True)
        aux["low"], aux["high"] = low, high
        mod = linear_map(module, a, w, zero_b) - linear_map(module, low, w.clamp(min=0), zero_b) \
            - linear_map(module, high, w.clamp(max=0), zero_b)
        return z.detach() + trick(z, mod, opts.stabilizer)
    if rule == "flat":
        ones = torch.ones_like(a).requires_grad_(True)
        aux["ones"] = ones
        return z.detach() + trick(z, linear_map(module, ones, torch.ones_like(w), zero_b), opts.stabilizer)
    raise ConvlensError(f"unknown LRP rule {rule!r}; choose from {', '.join(RULES)}")


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> LayerParams:
    """BN(conv(a)) as one convolution: W·s, (b − μ)·s + β with s = γ/√(σ² + ε) (eval statistics)."""
    scale = 1 / torch.sqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias.detach() if bn.affine else 0
    weight = conv.weight.detach() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    return LayerParams(weight, (bias - bn.running_mean) * scale + shift)


def trace_layers(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Module], dict[nn.Module, nn.BatchNorm2d]]:
    """(conv/linear modules in execution order, {conv: the BatchNorm fed directly by its output})."""
    order: list[nn.Module] = []
    produced: dict[int, nn.Module] = {}
    pairs: dict[nn.Module, nn.BatchNorm2d] = {}
    handles = []

    def on_linear(m, _i, out):
        order.append(m)
        produced[id(out)] = (m, out)  # kept alive: an id cannot be reused during the probe

    def on_bn(m, inputs, _o):
        src = produced.get(id(inputs[0]), (None, None))[0]
        if src is not None and isinstance(src, nn.Conv2d) and src.out_channels == m.num_features \
                and m.running_mean is not None:
            pairs[src] = m

    try:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(on_linear))
            elif isinstance(m, nn.BatchNorm2d):
                handles.append(m.register_forward_hook(on_bn))
        with torch.no_grad(), input_size_errors(x):
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order)), pairs


class LRP(Method):
    """LRP with a ``composite``: a name from ``COMPOSITES`` ('epsilon-plus', 'epsilon-gamma-box', …) or a
    dict {'Conv2d': rule, 'Linear': rule, 'first': rule} (rules: see the module doc); ``rule`` applies one
    rule to every layer instead. Options: ``epsilon`` (ε rule), ``gamma``, ``stabilizer`` (other rules),
    ``low``/``high`` (z^B bounds in the first layer's input space; default: each input's min and max),
    ``canonize`` (fold BatchNorm into the preceding convolution, default True).

    The relevance is taken at the first linear layer's input; ``extras["conservation"]`` holds
    Σ R_input / y per input (1 for conservative rules without biases).
    """

    name = "lrp"
    signed = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear",
                 composite="epsilon-plus", rule: str | None = None, epsilon: float = 0.25, gamma: float = 0.25,
                 stabilizer: float = 1e-6, low=None, high=None, canonize: bool = True):
        super().__init__(model, layer, output_selector, interpolation)
        if rule is not None:
            if rule not in RULES:
                raise ConvlensError(f"unknown LRP rule {rule!r}; choose from {', '.join(RULES)}")
            composite = {"Conv2d": rule, "Linear": rule} if rule not in FIRST_ONLY else {"first": rule}
        self.composite = self.check_composite(composite)
        if epsilon < 0 or gamma < 0 or stabilizer <= 0:
            raise ConvlensError("LRP needs epsilon ≥ 0, gamma ≥ 0 and stabilizer > 0")
        self.epsilon, self.gamma, self.stabilizer = epsilon, gamma, stabilizer
        self.low, self.high, self.canonize = low, high, canonize

    def check_composite(self, composite) -> dict[str, str]:
        if isinstance(composite, str):
            if composite not in COMPOSITES:
                raise ConvlensError(f"unknown LRP composite {composite!r}; choose from {', '.join(COMPOSITES)}")
            return COMPOSITES[composite]
        if not isinstance(composite, dict):
            raise ConvlensError("an LRP composite is a name or a dict {layer type: rule}")
        for key, rule in composite.items():
            if key != "first" and key not in LAYER_TYPES:
                raise ConvlensError(f"LRP composite names layer type {key!r}; use {', '.join(LAYER_TYPES)} or first")
            if rule not in RULES or (rule in FIRST_ONLY and key != "first"):
                raise ConvlensError(f"LRP rule {rule!r} cannot apply to {key}")
            if key != "first" and not any(isinstance(m, LAYER_TYPES[key]) for m in self.model.modules()):
                raise ConvlensError(f"LRP composite names layer type {key} but the model has no {key} layer")
        return dict(composite)

    def box_bounds(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def bound(value, reduce):
            if value is None:
                return reduce(a.detach().flatten(1), 1).values.view(-1, *([1] * (a.dim() - 1))).expand_as(a).clone()
            return torch.as_tensor(value, dtype=a.dtype, device=a.device).expand_as(a).clone()
        return bound(self.low, torch.min), bound(self.high, torch.max)

    def rule_for(self, module: nn.Module, first: bool) -> str | None:
        if first and "first" in self.composite:
            return self.composite["first"]
        for key, kind in LAYER_TYPES.items():
            if isinstance(module, kind) and key in self.composite:
                return self.composite[key]
        return None

    @contextlib.contextmanager
    def rules(self, x: torch.Tensor, store: dict) -> Iterator[None]:
        """Rule hooks on every conv / linear layer (and BatchNorm → identity where folded)."""
        order, pairs = trace_layers(self.model, x)
        if not order:
            raise ConvlensError("LRP needs at least one Conv2d or Linear layer")
        rewrites = {}
        for i, module in enumerate(order):
            rule = self.rule_for(module, i == 0)
            fold = self.canonize and module in pairs
            params = folded(module, pairs[module]) if fold else LayerParams(
                module.weight.detach(), module.bias.detach() if module.bias is not None else
                torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device))
            rewrites[module] = self.layer_hook(module, rule, params, i == 0, fold, store)
        if self.canonize:
            for bn in pairs.values():
                rewrites[bn] = lambda out, inputs: inputs[0]
        with rewrite_outputs(self.model, rewrites):
            yield

    def layer_hook(self, module, rule, params: LayerParams, first: bool, fold: bool, store: dict):
        """Output rewrite of one layer; a layer without a rule keeps its gradient (LRP-0)."""
        def rewrite(out, inputs):
            if _Guard.active:
                return None
            a = inputs[0]
            if first:  # the relevance is read here: a fresh leaf
                a = a.detach().requires_grad_(True)
                store["input"] = a
            if rule is None and not (first or fold):
                return None
            with torch.no_grad():
                z = linear_map(module, a, params.weight, params.bias) if fold else out.detach()
            return rule_output(rule or "zero", module, a, z, params, self, store)
        return rewrite

    def compute(self, x, target) -> Attribution:
        store: dict[str, torch.Tensor] = {}
        with frozen(self.model), self.rules(x, store), relu_rule(pass_relevance), torch.enable_grad():
            scores = self.scores(x)
            resolved = self.resolve_target(target, scores.detach())
            explained = resolved.explained(scores)
            names = ["input"] + [k for k in ("low", "high", "ones") if k in store]
            grads = torch.autograd.grad(explained.sum(), [store[k] for k in names], allow_unused=True)
        raw = torch.zeros_like(store["input"])
        for name, g in zip(names, grads):
            if g is not None:  # R = Σ value ⊙ ∂ over the first layer's inputs (the flat rule's are ones)
                raw = raw + (g if name == "ones" else store[name].detach() * g)
        maps = raw.sum(1) if raw.dim() == 4 else raw
        if maps.dim() == 3 and tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        conservation = raw.flatten(1).sum(1) / explained.detach().where(explained.detach() != 0,
                                                                        torch.ones_like(explained.detach()))
        return Attribution(self.name, raw, maps, resolved, extras={"conservation": conservation.cpu()})
