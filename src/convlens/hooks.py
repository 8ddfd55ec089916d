"""The one hook engine every method uses.

* :func:`capture` — forward hooks on named layers, scoped and removed in ``finally``.
  The hook keeps the layer's own output tensor and hands a clone downstream, so an
  in-place op after the layer (``ReLU(inplace=True)``) cannot corrupt what was kept
  and gradients taken with respect to the kept tensor are those of the layer output.
  With ``cut=True`` the kept tensor is a fresh leaf: backpropagation stops at the layer.
* :func:`frozen` — parameters stop requiring grad for the duration (no parameter
  gradients, no graph upstream of the input), restored exactly afterwards.
* :func:`evaluating` — every module in eval mode for the duration (no dropout, BatchNorm
  uses and keeps its running statistics); each module's own flag restored afterwards.
* :func:`relu_rule` — guided-backprop / deconvnet backward rules for every ReLU-family
  call (``nn.ReLU``, ``nn.ReLU6``, in place or not, ``F.relu``, ``torch.relu``,
  ``Tensor.relu``, ``x.relu_()``, ``torch.relu_``, ``F.hardtanh(·, 0, t)``,
  ``clamp(min=0)`` / ``clamp(0, t)``), intercepted with a TorchFunctionMode so functional
  ReLUs are covered too and the model's modules are never modified. The forward is the
  plain one bit for bit; in-place calls modify their input in place as they would without
  the rule. :func:`relu_calls` is the same interception with any handler (DeepLIFT's reference pass).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvlensError

POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name}


def resolve_layer(model: nn.Module, name: str | nn.Module) -> tuple[str, nn.Module]:
    """Module path → (path, module); an unknown name lists the available layers."""
    modules = named_modules(model)
    if isinstance(name, nn.Module):
        for path, mod in modules.items():
            if mod is name:
                return path, mod
        raise ConvlensError("the given layer module is not part of the model")
    if name not in modules:
        shown = list(modules) if len(modules) <= 60 else [n for n in modules if n.count(".") <= 1]
        more = f" (and {len(modules) - len(shown)} deeper modules)" if len(shown) < len(modules) else ""
        raise ConvlensError(f"unknown layer {name!r}; available layers: {', '.join(shown)}{more}")
    return name, modules[name]


@dataclass
class Captured:
    """Layer outputs kept by :func:`capture`, by module path, in the order they ran."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise ConvlensError(f"layer {name!r} did not run during the forward pass")
        return self.outputs[name]


def _capture_hook(store: Captured, name: str, cut: bool):
    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            return None
        if cut or (torch.is_grad_enabled() and not output.requires_grad):
            kept = output.detach().requires_grad_(True)
        else:
            kept = output
        store.outputs[name] = kept
        return kept.clone()
    return hook


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[str | nn.Module], cut: bool = False) -> Iterator[Captured]:
    """Keep the outputs of ``layers`` during forwards run inside the block (see module doc)."""
    store = Captured()
    resolved = [resolve_layer(model, layer) for layer in layers]
    handles = []
    try:
        for path, module in resolved:
            handles.append(module.register_forward_hook(_capture_hook(store, path, cut)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def rewrite_outputs(model: nn.Module, rewrites: dict) -> Iterator[None]:
    """Replace the output of each named layer (or module) by ``fn(output)`` (or ``fn(output, inputs)`` when
    the function takes two arguments) during forwards run inside the block; hooks removed in ``finally``."""
    import inspect

    handles = []

    def hook_for(fn):
        takes_inputs = len(inspect.signature(fn).parameters) >= 2
        return lambda _m, inputs, output: fn(output, inputs) if takes_inputs else fn(output)

    try:
        for layer, fn in rewrites.items():
            handles.append(resolve_layer(model, layer)[1].register_forward_hook(hook_for(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters do not require grad inside the block; each flag is restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode inside the block; each module's own ``training`` flag restored
    afterwards (also after an exception), so a model in train mode is neither changed nor left changed."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in zip(modules, flags):
            module.training = flag


@contextlib.contextmanager
def observe_outputs(model: nn.Module) -> Iterator[list[tuple[str, torch.Size, nn.Module]]]:
    """Record (path, output shape, module) of every module, in the order they finish."""
    seen: list[tuple[str, torch.Size, nn.Module]] = []
    handles = []
    try:
        for path, module in named_modules(model).items():
            handles.append(module.register_forward_hook(
                lambda m, _i, out, path=path: seen.append((path, out.shape, m)) if isinstance(out, torch.Tensor) else None))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def spatial_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, torch.Size, nn.Module]]:
    """Modules with a 4-D output larger than 1×1, in execution order (one forward of ``example``)."""
    with observe_outputs(model) as seen, torch.no_grad():
        model(example[:1])
    return [(p, s, m) for p, s, m in seen if len(s) == 4 and s[-1] * s[-2] > 1]


_AUTO_LAYERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def auto_layer(model: nn.Module, example: torch.Tensor, kerasvis: bool = False) -> str:
    """The layer CAM methods use by default.

    Default: the last module with a spatial 4-D output that is not a pooling layer (the
    last conv block before the head). ``kerasvis``: the last conv or pooling layer, as
    keras-vis picks it. Found by one forward of ``example[:1]``, then remembered for the model (weakly), the
    input's shape and the model's modules (a module replaced or added is another key).
    """
    key = (tuple(example.shape[1:]), kerasvis, tuple(map(id, model.modules())))
    known = _AUTO_LAYERS.setdefault(model, {})
    if key not in known:
        known[key] = find_auto_layer(model, example, kerasvis)
    return known[key]


def find_auto_layer(model: nn.Module, example: torch.Tensor, kerasvis: bool = False) -> str:
    """:func:`auto_layer` without the memory: one forward of ``example[:1]``."""
    layers = spatial_layers(model, example)
    if kerasvis:
        layers = [x for x in layers if isinstance(x[2], (nn.Conv2d,) + POOLING) or "conv" in type(x[2]).__name__.lower()]
    else:
        layers = [x for x in layers if not isinstance(x[2], POOLING)]
    if not layers:
        raise ConvlensError("the model has no layer with a spatial (N, C, H, W) output: CAM methods need one")
    return layers[-1][0]


# ----------------------------------------------------------------- ReLU rules
class _RuleReLU(torch.autograd.Function):
    """y = clamp(x, 0, upper) (in place when asked); backward by the guided or deconvnet rule.

    The backward needs only where 0 < x (< upper), which equals 0 < y (< upper): the output is
    saved, so an in-place call can overwrite its input as the plain forward does.
    """

    @staticmethod
    def forward(ctx, x, upper, rule, inplace):
        if inplace:
            out = x.clamp_(0, upper) if upper is not None else x.clamp_min_(0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(0, upper) if upper is not None else x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.upper, ctx.rule = upper, rule
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        positive = grad_out.clamp(min=0)
        if ctx.rule == "deconvnet":
            return positive, None, None, None
        # the unit's own local gradient, fused by the native kernels: (0 < x [< upper])
        if ctx.upper is None:
            return torch.ops.aten.threshold_backward(positive, out, 0), None, None, None
        return torch.ops.aten.hardtanh_backward(positive, out, 0, ctx.upper), None, None, None


_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_CLAMP = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, torch.clamp_min, torch.Tensor.clamp_min}
_CLAMP_INPLACE = {torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_, torch.clamp_min_,
                  torch.Tensor.clamp_min_}


def _arg(args, kwargs, index: int, name: str, default):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else default)


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def relu_call(func, args, kwargs) -> tuple[float | None, bool] | None:
    """(upper bound or None, in place) when ``func(*args, **kwargs)`` is a ReLU-family call, else None."""
    if func in _RELU or func in _RELU_INPLACE:
        return None, func in _RELU_INPLACE or bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.relu6:
        return 6.0, bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.hardtanh:
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        return (float(hi), bool(_arg(args, kwargs, 3, "inplace", False))) if _is_zero(lo) and hi > 0 else None
    if func in _CLAMP or func in _CLAMP_INPLACE:
        lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        if _is_zero(lo) and (hi is None or (isinstance(hi, (int, float)) and hi > 0)):
            return (None if hi is None else float(hi)), func in _CLAMP_INPLACE
    return None


class _CallableRuleReLU(torch.autograd.Function):
    """y = clamp(x, 0, upper) (in place when asked); backward ``rule(x, y, grad_out, upper)`` (input kept)."""

    @staticmethod
    def forward(ctx, x, upper, rule, inplace):
        kept = x.clone() if inplace else x
        if inplace:
            out = x.clamp_(0, upper) if upper is not None else x.clamp_min_(0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(0, upper) if upper is not None else x.clamp_min(0)
        ctx.save_for_backward(kept, out)
        ctx.upper, ctx.rule = upper, rule
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        return ctx.rule(x, out, grad_out, ctx.upper), None, None, None


class _ReluCallMode(TorchFunctionMode):
    """Hands every ReLU-family call on a floating tensor ``x`` to
    ``handle(func, args, kwargs, x, upper, inplace)``, whose result is the call's result; every other call
    runs as it is."""

    def __init__(self, handle: Callable):
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = relu_call(func, args, kwargs)
        x = args[0] if args else kwargs.get("input")
        if call is None or not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return func(*args, **kwargs)
        return self.handle(func, args, kwargs, x, *call)


@contextlib.contextmanager
def relu_calls(handle: Callable) -> Iterator[None]:
    """Route every ReLU-family call in the block through ``handle`` (see :class:`_ReluCallMode`): the
    interception under :func:`relu_rule` and DeepLIFT's reference pass."""
    with _ReluCallMode(handle):
        yield


class _ReluRuleMode(_ReluCallMode):
    def __init__(self, rule):
        super().__init__(self.apply_rule)
        self.rule = rule
        self.calls = 0

    def apply_rule(self, func, args, kwargs, x, upper, inplace):
        if not x.requires_grad:
            return func(*args, **kwargs)
        self.calls += 1
        if callable(self.rule):
            return _CallableRuleReLU.apply(x, upper, self.rule, inplace)
        return _RuleReLU.apply(x, upper, self.rule, inplace)


@contextlib.contextmanager
def relu_rule(rule) -> Iterator[_ReluRuleMode]:
    """Apply the ``"guided"`` or ``"deconvnet"`` backward rule to every ReLU-family call in the block, or a
    callable ``rule(x, y, grad_out, upper) → grad_in`` (DeepLIFT's rescale, LRP's relevance pass)."""
    if not callable(rule) and rule not in ("guided", "deconvnet"):
        raise ValueError(f"unknown ReLU rule {rule!r}")
    mode = _ReluRuleMode(rule)
    with mode:
        yield mode


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks currently registered on the model's modules."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total
