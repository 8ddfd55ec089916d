"""Torch modules for ONNX operators, and one converter per supported operator.

A converter takes a :class:`NodeContext` (the node, its attributes, which inputs are
constants and their values, input ranks when ONNX shape inference knows them) and
returns an ``nn.Module`` that computes the node's first output from its runtime inputs.

* Layers become the standard torch modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
  ``nn.Linear``, ``nn.ReLU``, ``nn.ReLU6``, ``nn.MaxPool2d`` …) with the ONNX weights
  copied in, so that isinstance checks, hooks and the guided-backprop ReLU rule see
  ordinary layers. Padding torch cannot express (asymmetric, ``auto_pad`` SAME) is
  applied by subclasses (``PaddedConv2d`` …, still ``nn.Conv2d``) before the layer.
* Weightless operators (Add, Reshape, Concat, Gather …) become an :class:`OnnxFunction`:
  a function of the node's inputs whose constant inputs are stored in the module
  (tensors as buffers, so ``.to(device)`` moves them; shape-like integers as lists).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConvlensError

RUNTIME = object()  # marks an input slot filled at forward time


@dataclass
class NodeContext:
    """What a converter knows about one ONNX node."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    consts: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and bool(self.inputs[i])

    def const(self, i: int) -> torch.Tensor | None:
        """Value of input ``i`` when it is known at conversion time (None when absent or runtime)."""
        return self.consts.get(self.inputs[i]) if self.has_input(i) else None

    def is_runtime(self, i: int) -> bool:
        return self.has_input(i) and self.inputs[i] not in self.consts

    def require_const(self, i: int, what: str) -> torch.Tensor:
        value = self.const(i)
        if value is None:
            self.fail(f"its {what} is computed at run time; only constant {what}s are supported")
        return value

    def rank(self, i: int = 0) -> int | None:
        return self.ranks.get(self.inputs[i]) if self.has_input(i) else None

    def fail(self, why: str):
        raise ConvlensError(f"ONNX operator {self.op!r} (node {self.name!r}): {why}")


def as_ints(value) -> list[int]:
    """A shape-like argument (list, int, or integer tensor) as a list of ints."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# ---------------------------------------------------------------- generic module
class OnnxFunction(nn.Module):
    """A weightless ONNX operator: ``fn(*inputs, **params)`` with its constant inputs stored here."""

    def __init__(self, op: str, fn: Callable, slots: list, params: dict | None = None):
        super().__init__()
        self.op, self.fn, self.params = op, fn, params or {}
        self.kinds: list[str] = []  # per slot: "runtime", "buffer", or "value"
        self.values: dict[int, Any] = {}
        for i, slot in enumerate(slots):
            if slot is RUNTIME:
                self.kinds.append("runtime")
            elif isinstance(slot, torch.Tensor):
                self.kinds.append("buffer")
                self.register_buffer(f"const{i}", slot)
            else:
                self.kinds.append("value")
                self.values[i] = slot
        self.runtime_positions = [i for i, k in enumerate(self.kinds) if k == "runtime"]

    def forward(self, *runtime: torch.Tensor):
        given = iter(runtime)
        args = [next(given) if kind == "runtime" else getattr(self, f"const{i}") if kind == "buffer"
                else self.values[i] for i, kind in enumerate(self.kinds)]
        return self.fn(*args, **self.params)

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"op={self.op!r}" + (f", {shown}" if shown else "")


def function_node(ctx: NodeContext, function: Callable, ints: tuple[int, ...] = (), **params) -> OnnxFunction:
    """An :class:`OnnxFunction` for ``ctx``: constants at positions ``ints`` become int lists."""
    slots: list = []
    for i, name in enumerate(ctx.inputs):
        if not name:
            slots.append(None)
        elif name in ctx.consts:
            value = ctx.consts[name]
            slots.append(as_ints(value) if i in ints else value)
        else:
            slots.append(RUNTIME)
    return OnnxFunction(ctx.op, function, slots, params)


def runtime_positions(module: nn.Module) -> list[int]:
    """Which node inputs the module takes in ``forward`` (layers: the first only)."""
    return module.runtime_positions if isinstance(module, OnnxFunction) else [0]


# ---------------------------------------------------------------- padding
def same_pads(sizes, kernel, stride, dilation, upper: bool) -> list[tuple[int, int]]:
    """ONNX auto_pad SAME: output = ceil(in / s); total = max(0, (out−1)·s + (k−1)·d + 1 − in),
    the odd pixel at the end (SAME_UPPER) or at the start (SAME_LOWER)."""
    pads = []
    for n, k, s, d in zip(sizes, kernel, stride, dilation):
        total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
        small = total // 2
        pads.append((small, total - small) if upper else (total - small, small))
    return pads


def torch_pad_list(pads: list[tuple[int, int]]) -> list[int]:
    """Per-dimension (begin, end) pairs, first spatial dim first → F.pad's last-dim-first list."""
    return [p for pair in reversed(pads) for p in pair]


def _tuple(value, k: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * k


class OnnxPadded:
    """Mixin: pads the input the ONNX way (explicit begin/end pads or auto_pad SAME) before the layer.

    ``onnx_padding`` is a list of (begin, end) pairs per spatial dimension, or "SAME_UPPER" /
    "SAME_LOWER"; ``pad_value`` is 0 (convolution) or −inf (max pooling).
    """

    onnx_padding: Any = None
    pad_value: float = 0.0

    def set_onnx_padding(self, padding, value: float = 0.0):
        self.onnx_padding, self.pad_value = padding, value
        return self

    def _pads_for(self, x: torch.Tensor) -> list[tuple[int, int]]:
        if not isinstance(self.onnx_padding, str):
            return self.onnx_padding
        k = x.dim() - 2
        kernel = _tuple(self.kernel_size, k)
        stride = _tuple(self.stride if self.stride is not None else kernel, k)
        dilation = _tuple(getattr(self, "dilation", 1), k)
        return same_pads(x.shape[2:], kernel, stride, dilation, self.onnx_padding == "SAME_UPPER")

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        pads = torch_pad_list(self._pads_for(x))
        return F.pad(x, pads, value=self.pad_value) if any(pads) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad_input(x))


class PaddedConv1d(OnnxPadded, nn.Conv1d):
    pass


class PaddedConv2d(OnnxPadded, nn.Conv2d):
    pass


class PaddedConv3d(OnnxPadded, nn.Conv3d):
    pass


class PaddedMaxPool1d(OnnxPadded, nn.MaxPool1d):
    pass


class PaddedMaxPool2d(OnnxPadded, nn.MaxPool2d):
    pass


class PaddedMaxPool3d(OnnxPadded, nn.MaxPool3d):
    pass


class PaddedAvgPool(OnnxPadded):
    """Average pooling after explicit padding; without ``count_include_pad`` the window sum is
    divided by the number of real (unpadded) pixels: pool(pad(x)) / pool(pad(1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = super(OnnxPadded, self).forward  # the torch pooling layer's own forward
        if self.count_include_pad:
            return pool(self.pad_input(x))
        ones = torch.ones_like(x[:1, :1])
        return pool(self.pad_input(x)) / pool(self.pad_input(ones))


class PaddedAvgPool1d(PaddedAvgPool, nn.AvgPool1d):
    pass


class PaddedAvgPool2d(PaddedAvgPool, nn.AvgPool2d):
    pass


class PaddedAvgPool3d(PaddedAvgPool, nn.AvgPool3d):
    pass


CONV = {1: (nn.Conv1d, PaddedConv1d), 2: (nn.Conv2d, PaddedConv2d), 3: (nn.Conv3d, PaddedConv3d)}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAXPOOL = {1: (nn.MaxPool1d, PaddedMaxPool1d), 2: (nn.MaxPool2d, PaddedMaxPool2d), 3: (nn.MaxPool3d, PaddedMaxPool3d)}
AVGPOOL = {1: (nn.AvgPool1d, PaddedAvgPool1d), 2: (nn.AvgPool2d, PaddedAvgPool2d), 3: (nn.AvgPool3d, PaddedAvgPool3d)}


def window_padding(ctx: NodeContext, k: int):
    """(symmetric torch padding tuple or None, ONNX padding for :class:`OnnxPadded`)."""
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return None, auto_pad
    if auto_pad == "VALID":
        return (0,) * k, None
    if auto_pad != "NOTSET":
        ctx.fail(f"unknown auto_pad {auto_pad!r}")
    pads = as_ints(ctx.attr("pads", [0] * (2 * k)))
    pairs = list(zip(pads[:k], pads[k:]))
    if all(b == e for b, e in pairs):
        return tuple(pads[:k]), pairs
    return None, pairs


# ---------------------------------------------------------------- layers
def convert_conv(ctx: NodeContext) -> nn.Module:
    weight = ctx.require_const(1, "weight")
    bias = ctx.const(2)
    if ctx.is_runtime(2):
        ctx.fail("its bias is computed at run time")
    k = weight.dim() - 2
    if k not in CONV:
        ctx.fail(f"{k}-D convolution")
    groups = int(ctx.attr("group", 1))
    stride = tuple(as_ints(ctx.attr("strides", [1] * k)))
    dilation = tuple(as_ints(ctx.attr("dilations", [1] * k)))
    padding, onnx_padding = window_padding(ctx, k)
    plain, padded = CONV[k]
    common = dict(in_channels=weight.shape[1] * groups, out_channels=weight.shape[0],
                  kernel_size=tuple(weight.shape[2:]), stride=stride, dilation=dilation, groups=groups,
                  bias=bias is not None)
    if padding is not None:
        conv = plain(padding=padding, **common)
    else:
        conv = padded(padding=0, **common).set_onnx_padding(onnx_padding)
    load_parameters(conv, weight=weight, bias=bias)
    return conv


def convert_conv_transpose(ctx: NodeContext) -> nn.Module:
    weight = ctx.require_const(1, "weight")
    bias = ctx.const(2)
    k = weight.dim() - 2
    if k not in CONV_T:
        ctx.fail(f"{k}-D transposed convolution")
    if ctx.attr("output_shape") is not None or ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        ctx.fail("output_shape / auto_pad SAME are not supported; export with explicit pads")
    pads = as_ints(ctx.attr("pads", [0] * (2 * k)))
    if pads[:k] != pads[k:]:
        ctx.fail("asymmetric pads are not supported")
    groups = int(ctx.attr("group", 1))
    conv = CONV_T[k](weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                     stride=tuple(as_ints(ctx.attr("strides", [1] * k))), padding=tuple(pads[:k]),
                     output_padding=tuple(as_ints(ctx.attr("output_padding", [0] * k))), groups=groups,
                     bias=bias is not None, dilation=tuple(as_ints(ctx.attr("dilations", [1] * k))))
    load_parameters(conv, weight=weight, bias=bias)
    return conv


def load_parameters(module: nn.Module, **values: torch.Tensor | None) -> None:
    """Put constants in a fresh module's parameters/buffers of the same names (dtype follows the ONNX file).

    The loader's tensors are its own copies of the file's, so they are used without another copy
    (a large network is not held three times while it loads)."""
    for name, value in values.items():
        if value is None:
            continue
        current = getattr(module, name)
        tensor = value.detach().reshape(current.shape).contiguous()
        setattr(module, name, nn.Parameter(tensor) if isinstance(current, nn.Parameter) else tensor)


class AnyRankBatchNorm(_BatchNorm):
    """Batch normalization over dim 1 of an input of any rank ≥ 2 (used when the rank is unknown)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")


BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def convert_batchnorm(ctx: NodeContext) -> nn.Module:
    """y = (x − mean) / √(var + ε) · scale + B; ONNX momentum m ↔ torch momentum 1 − m."""
    if int(ctx.attr("training_mode", 0)):
        ctx.fail("training mode is not supported (export the model in eval mode)")
    scale, shift, mean, var = (ctx.require_const(i, what) for i, what in
                               ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")))
    cls = BATCHNORM.get(ctx.rank(0), AnyRankBatchNorm)
    bn = cls(scale.numel(), eps=float(ctx.attr("epsilon", 1e-5)), momentum=1.0 - float(ctx.attr("momentum", 0.9)))
    load_parameters(bn, weight=scale, bias=shift, running_mean=mean, running_var=var)
    return bn


INSTANCENORM = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}


def convert_instancenorm(ctx: NodeContext) -> nn.Module:
    """y = scale · (x − mean) / √(var + ε) + B, statistics per sample and channel."""
    scale, shift = ctx.require_const(1, "scale"), ctx.require_const(2, "bias")
    cls = INSTANCENORM.get(ctx.rank(0))
    if cls is None:
        ctx.fail("the input's rank must be known (3 to 5)")
    norm = cls(scale.numel(), eps=float(ctx.attr("epsilon", 1e-5)), affine=True)
    load_parameters(norm, weight=scale, bias=shift)
    return norm


def convert_lrn(ctx: NodeContext) -> nn.Module:
    """y = x / (bias + α/size · Σ x²)^β over ``size`` channels around each one; torch's
    LocalResponseNorm centres the window the same way when ``size`` is odd."""
    size = int(ctx.attr("size"))
    options = dict(alpha=float(ctx.attr("alpha", 1e-4)), beta=float(ctx.attr("beta", 0.75)),
                   bias=float(ctx.attr("bias", 1.0)))
    if size % 2:
        return nn.LocalResponseNorm(size, options["alpha"], options["beta"], options["bias"])
    return function_node(ctx, local_response_norm, size=size, **options)


def local_response_norm(x, *, size: int, alpha: float, beta: float, bias: float):
    """ONNX LRN for an even window: ⌊(size−1)/2⌋ channels before, ⌈(size−1)/2⌉ after."""
    squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    squares = F.pad(squares, [0, 0, (size - 1) // 2, size // 2])
    window_sum = F.avg_pool2d(squares, (size, 1), stride=1) * size
    return x / (bias + alpha / size * window_sum.reshape(x.shape)) ** beta


def convert_gemm(ctx: NodeContext) -> nn.Module:
    """Y = α·A'·B' + β·C; with constant B and C and no transA: nn.Linear(W = α·B'ᵀ, b = β·C)."""
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    b, c = ctx.const(1), ctx.const(2)
    out_features = None if b is None else (b.shape[0] if trans_b else b.shape[1])
    bias_fits = c is None or c.numel() in (1, out_features) and (c.dim() < 2 or c.shape[-1] == c.numel())
    if ctx.is_runtime(0) and b is not None and not trans_a and not ctx.is_runtime(2) and bias_fits:
        weight = alpha * (b if trans_b else b.t())
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=c is not None)
        bias = None if c is None else (beta * c.flatten()).expand(weight.shape[0])
        load_parameters(linear, weight=weight, bias=bias)
        return linear
    return function_node(ctx, gemm, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)


def gemm(a, b, c=None, *, alpha: float, beta: float, trans_a: int, trans_b: int):
    y = alpha * ((a.t() if trans_a else a) @ (b.t() if trans_b else b))
    return y if c is None else y + beta * c


def convert_matmul(ctx: NodeContext) -> nn.Module:
    b = ctx.const(1)
    if ctx.is_runtime(0) and b is not None and b.dim() == 2:
        linear = nn.Linear(b.shape[0], b.shape[1], bias=False)
        load_parameters(linear, weight=b.t())
        return linear
    return function_node(ctx, torch.matmul)


def clip_bounds(ctx: NodeContext) -> tuple[float | None, float | None]:
    """Clip's (min, max): attributes before opset 11, optional constant inputs after."""
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
        return (None if lo is None or lo <= -3.4e38 else float(lo)), (None if hi is None or hi >= 3.4e38 else float(hi))
    bounds = []
    for i in (1, 2):
        if ctx.is_runtime(i):
            ctx.fail("bounds computed at run time are not supported")
        value = ctx.const(i)
        bounds.append(None if value is None or not math.isfinite(float(value)) else float(value))
    return bounds[0], bounds[1]


class Clamp(nn.Module):
    """y = clamp(x, min, max) with either bound optional."""

    def __init__(self, lo: float | None, hi: float | None):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return x.clamp(self.lo, self.hi)

    def extra_repr(self):
        return f"min={self.lo}, max={self.hi}"


def convert_clip(ctx: NodeContext) -> nn.Module:
    """ReLU (min 0), ReLU6 (0, 6), Hardtanh (both bounds), else a clamp."""
    lo, hi = clip_bounds(ctx)
    if lo is None and hi is None:
        return nn.Identity()
    if lo == 0.0 and hi is None:
        return nn.ReLU()
    if lo == 0.0 and hi == 6.0:
        return nn.ReLU6()
    if lo is not None and hi is not None and lo < hi:
        return nn.Hardtanh(lo, hi)
    return Clamp(lo, hi)


class HardSigmoid(nn.Module):
    """y = max(0, min(1, α·x + β))."""

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        return (self.alpha * x + self.beta).clamp(0.0, 1.0)

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}"


def convert_hardsigmoid(ctx: NodeContext) -> nn.Module:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return nn.Hardsigmoid()
    return HardSigmoid(alpha, beta)


def convert_softmax(ctx: NodeContext, log: bool = False) -> nn.Module:
    """Opset ≥ 13: along ``axis`` (default −1). Before: over all dims from ``axis`` (default 1) on."""
    cls = nn.LogSoftmax if log else nn.Softmax
    if ctx.opset >= 13:
        return cls(dim=int(ctx.attr("axis", -1)))
    axis = int(ctx.attr("axis", 1))
    rank = ctx.rank(0)
    if rank is not None and axis % rank == rank - 1:
        return cls(dim=axis)
    return function_node(ctx, coerced_softmax, axis=axis, log=log)


def coerced_softmax(x, *, axis: int, log: bool):
    """Softmax over the flattened dims from ``axis`` on (ONNX before opset 13)."""
    flat = x.flatten(axis % x.dim())
    return (flat.log_softmax(-1) if log else flat.softmax(-1)).reshape(x.shape)


def pool_common(ctx: NodeContext) -> tuple[int, tuple, tuple, tuple, Any, Any]:
    if ctx.attr("kernel_shape") is None:
        ctx.fail("no kernel_shape")
    kernel = tuple(as_ints(ctx.attr("kernel_shape")))
    k = len(kernel)
    if k not in MAXPOOL:
        ctx.fail(f"{k}-D pooling")
    stride = tuple(as_ints(ctx.attr("strides", [1] * k)))
    dilation = tuple(as_ints(ctx.attr("dilations", [1] * k)))
    padding, onnx_padding = window_padding(ctx, k)
    return k, kernel, stride, dilation, padding, onnx_padding


def fits_torch_padding(padding, kernel, dilation) -> bool:
    """torch pools accept symmetric padding of at most half the effective kernel."""
    return padding is not None and all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(padding, kernel, dilation))


def convert_maxpool(ctx: NodeContext) -> nn.Module:
    k, kernel, stride, dilation, padding, onnx_padding = pool_common(ctx)
    ceil = bool(ctx.attr("ceil_mode", 0))
    plain, padded = MAXPOOL[k]
    if fits_torch_padding(padding, kernel, dilation):
        return plain(kernel, stride, padding, dilation, ceil_mode=ceil)
    return padded(kernel, stride, 0, dilation, ceil_mode=ceil).set_onnx_padding(onnx_padding, float("-inf"))


def convert_avgpool(ctx: NodeContext) -> nn.Module:
    k, kernel, stride, dilation, padding, onnx_padding = pool_common(ctx)
    if any(d != 1 for d in dilation):
        ctx.fail("dilated average pooling is not supported")
    ceil, include = bool(ctx.attr("ceil_mode", 0)), bool(ctx.attr("count_include_pad", 0))
    plain, padded = AVGPOOL[k]
    if fits_torch_padding(padding, kernel, dilation):
        return plain(kernel, stride, padding, ceil_mode=ceil, count_include_pad=include)
    if ceil:
        ctx.fail("ceil_mode with padding that torch cannot express is not supported")
    return padded(kernel, stride, 0, count_include_pad=include).set_onnx_padding(onnx_padding)


GLOBAL_AVG = {3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d, 5: nn.AdaptiveAvgPool3d}
GLOBAL_MAX = {3: nn.AdaptiveMaxPool1d, 4: nn.AdaptiveMaxPool2d, 5: nn.AdaptiveMaxPool3d}


def convert_global_pool(ctx: NodeContext, kind: str) -> nn.Module:
    table = GLOBAL_AVG if kind == "avg" else GLOBAL_MAX
    cls = table.get(ctx.rank(0))
    if cls is not None:
        return cls(1)
    return function_node(ctx, global_pool, kind=kind)


def global_pool(x, *, kind: str):
    dims = tuple(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)


def convert_flatten(ctx: NodeContext) -> nn.Module:
    """To 2-D: (∏ dims before ``axis``, ∏ dims from ``axis`` on)."""
    axis = int(ctx.attr("axis", 1))
    if axis == 1:
        return nn.Flatten()
    return function_node(ctx, flatten, axis=axis)


def flatten(x, *, axis: int):
    a = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))


# ---------------------------------------------------------------- weightless operators
def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def reshape(x, shape, allowzero: int = 0):
    shape = as_ints(shape)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in as_ints(axes)))


def unsqueeze(x, axes):
    rank = x.dim() + len(as_ints(axes))
    for a in sorted(_axis(a, rank) for a in as_ints(axes)):
        x = x.unsqueeze(a)
    return x


def reduce(x, axes=None, *, how: str, keepdims: int = 1, noop_with_empty_axes: int = 0):
    """ReduceMean/Sum/Max/Min over ``axes`` (all when empty, unless noop_with_empty_axes)."""
    axes = [] if axes is None else as_ints(axes)
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    dims = tuple(_axis(a, x.dim()) for a in axes)
    keep = bool(keepdims)
    if how == "mean":
        return x.mean(dims, keepdim=keep)
    if how == "sum":
        return x.sum(dims, keepdim=keep)
    return x.amax(dims, keepdim=keep) if how == "max" else x.amin(dims, keepdim=keep)


def gather(x, indices, axis: int = 0):
    """ONNX Gather: out[i…, j…, k…] = x[i…, indices[j…], k…]; negative indices count from the end."""
    a = _axis(axis, x.dim())
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[a], idx)
    picked = x.index_select(a, idx.flatten())
    return picked.reshape(tuple(x.shape[:a]) + tuple(idx.shape) + tuple(x.shape[a + 1:]))


def shape_of(x, start: int = 0, end: int | None = None):
    return torch.tensor(tuple(x.shape)[start:end], dtype=torch.int64, device=x.device)


def pad(x, pads, value=None, axes=None, mode: str = "constant"):
    """ONNX pads = [b_axis0, b_axis1, …, e_axis0, e_axis1, …] (negative crops)."""
    pads = as_ints(pads)
    axes = list(range(x.dim())) if axes is None else [_axis(a, x.dim()) for a in as_ints(axes)]
    n = len(axes)
    per_dim = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    first = min((a for a, p in per_dim.items() if any(p)), default=x.dim())
    pairs = [per_dim.get(a, (0, 0)) for a in range(first, x.dim())]
    flat = torch_pad_list(pairs)
    if not flat:
        return x
    if mode == "constant":
        fill = 0.0 if value is None else float(value.item() if isinstance(value, torch.Tensor) else value)
        return F.pad(x, flat, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise ConvlensError(f"ONNX Pad mode {mode!r} is not supported")
    return F.pad(x, flat, mode=torch_mode)


def slice_(x, starts, ends, axes=None, steps=None):
    """Python-slicing semantics per axis (ONNX clamps the same way, negative steps included)."""
    starts, ends = as_ints(starts), as_ints(ends)
    axes = list(range(len(starts))) if axes is None else as_ints(axes)
    steps = [1] * len(starts) if steps is None else as_ints(steps)
    for start, end, a, step in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        if step > 0:
            index = [slice(None)] * x.dim()
            index[a] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            picked = list(range(x.shape[a]))[start:end:step]
            x = x.index_select(a, torch.tensor(picked, dtype=torch.long, device=x.device))
    return x


def expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(as_ints(shape))))


def constant_of_shape(shape, value=None):
    fill = torch.zeros(1) if value is None else value
    device = shape.device if isinstance(shape, torch.Tensor) else fill.device
    return torch.full(as_ints(shape), fill.flatten()[0].item(), dtype=fill.dtype, device=device)


def divide(a, b):
    """ONNX Div: true division for floats, truncation for integers."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def fold_left(*xs, fn: Callable):
    """Variadic Max / Min / Sum: fn(fn(x0, x1), x2) …"""
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def cast(x, *, dtype: torch.dtype):
    return x.to(dtype)


def constant(value):
    return value


def concat(*xs, axis: int):
    return torch.cat(xs, axis)


def transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else range(x.dim() - 1, -1, -1)))


def prelu(x, slope):
    return torch.where(x >= 0, x, x * slope)


ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def convert_cast(ctx: NodeContext) -> nn.Module:
    to = int(ctx.attr("to"))
    if to not in ONNX_DTYPES:
        ctx.fail(f"cast to ONNX data type {to}")
    return function_node(ctx, cast, dtype=ONNX_DTYPES[to])


def convert_constant(ctx: NodeContext) -> nn.Module:
    """Constant: the ``value`` tensor, or value_float(s) / value_int(s)."""
    for key, dtype in (("value", None), ("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in ctx.attrs:
            v = ctx.attrs[key]
            value = v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype)
            return OnnxFunction(ctx.op, constant, [value])
    ctx.fail("only tensor, float and int constants are supported")


def convert_squeeze(ctx: NodeContext) -> nn.Module:
    if ctx.opset < 13:
        return function_node(ctx, squeeze, axes=ctx.attr("axes"))
    return function_node(ctx, squeeze, ints=(1,))


def convert_unsqueeze(ctx: NodeContext) -> nn.Module:
    if ctx.opset < 13:
        return function_node(ctx, unsqueeze, axes=as_ints(ctx.attr("axes")))
    return function_node(ctx, unsqueeze, ints=(1,))


def convert_reduce(ctx: NodeContext, how: str) -> nn.Module:
    options = dict(how=how, keepdims=int(ctx.attr("keepdims", 1)),
                   noop_with_empty_axes=int(ctx.attr("noop_with_empty_axes", 0)))
    if ctx.attr("axes") is not None or not ctx.has_input(1):
        return function_node(ctx, reduce, axes=ctx.attr("axes"), **options)
    return function_node(ctx, reduce, ints=(1,), **options)


def convert_pad(ctx: NodeContext) -> nn.Module:
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11:
        return function_node(ctx, pad, pads=as_ints(ctx.attr("pads")), value=float(ctx.attr("value", 0.0)), mode=mode)
    return function_node(ctx, pad, ints=(1, 3), mode=mode)


def convert_slice(ctx: NodeContext) -> nn.Module:
    if ctx.opset < 10:
        return function_node(ctx, slice_, starts=ctx.attr("starts"), ends=ctx.attr("ends"), axes=ctx.attr("axes"))
    return function_node(ctx, slice_, ints=(1, 2, 3, 4))


def convert_transpose(ctx: NodeContext) -> nn.Module:
    return function_node(ctx, transpose, perm=ctx.attr("perm"))


def split(x, sizes=None, *, axis: int, count: int):
    """ONNX Split: ``sizes`` along ``axis``, or ``count`` parts of ⌈n / count⌉ (the last one smaller)."""
    if sizes is None:
        n = x.shape[_axis(axis, x.dim())]
        return tuple(torch.split(x, -(-n // count), dim=axis))
    return tuple(torch.split(x, as_ints(sizes), dim=axis))


def convert_split(ctx: NodeContext) -> nn.Module:
    """One value per output; split sizes from input 1 (opset ≥ 13), the ``split`` attribute, or equal parts."""
    options = dict(axis=int(ctx.attr("axis", 0)), count=int(ctx.attr("num_outputs", len(ctx.outputs))))
    if ctx.opset < 13 and ctx.attr("split") is not None:
        module = function_node(ctx, split, sizes=as_ints(ctx.attr("split")), **options)
    else:
        module = function_node(ctx, split, ints=(1,), **options)
    module.multi_output = True
    return module


def elementwise(fn: Callable) -> Callable[[NodeContext], nn.Module]:
    """Converter for a broadcasting operator; before opset 7, ``broadcast=1, axis=k`` aligns B with A's dim k."""
    def convert(ctx: NodeContext) -> nn.Module:
        if ctx.opset < 7 and ctx.attr("broadcast", 0) and ctx.attr("axis") is not None:
            return function_node(ctx, broadcast_from_axis, fn=fn, axis=int(ctx.attr("axis")))
        return function_node(ctx, fn)
    return convert


def broadcast_from_axis(a, b, *, fn: Callable, axis: int):
    """fn(A, B) with B's dims matched to A's dims from ``axis`` on (opset < 7 broadcasting)."""
    trailing = a.dim() - _axis(axis, a.dim()) - b.dim()
    return fn(a, b.reshape(*b.shape, *([1] * trailing)))


def convert_reshape(ctx: NodeContext) -> nn.Module:
    """Target shape: input 1 (opset ≥ 5) or the ``shape`` attribute; 0 copies the input's dim unless allowzero."""
    allowzero = int(ctx.attr("allowzero", 0))
    if ctx.opset < 5:
        return function_node(ctx, reshape, shape=as_ints(ctx.attr("shape")), allowzero=allowzero)
    return function_node(ctx, reshape, ints=(1,), allowzero=allowzero)


CONVERTERS: dict[str, Callable[[NodeContext], nn.Module]] = {
    # layers
    "Conv": convert_conv,
    "ConvTranspose": convert_conv_transpose,
    "BatchNormalization": convert_batchnorm,
    "InstanceNormalization": convert_instancenorm,
    "LRN": convert_lrn,
    "Gemm": convert_gemm,
    "MatMul": convert_matmul,
    "MaxPool": convert_maxpool,
    "AveragePool": convert_avgpool,
    "GlobalAveragePool": lambda ctx: convert_global_pool(ctx, "avg"),
    "GlobalMaxPool": lambda ctx: convert_global_pool(ctx, "max"),
    "Flatten": convert_flatten,
    "Identity": lambda ctx: nn.Identity(),
    "Dropout": lambda ctx: nn.Identity(),
    # activations
    "Relu": lambda ctx: nn.ReLU(),
    "Clip": convert_clip,
    "LeakyRelu": lambda ctx: nn.LeakyReLU(float(ctx.attr("alpha", 0.01))),
    "Sigmoid": lambda ctx: nn.Sigmoid(),
    "Tanh": lambda ctx: nn.Tanh(),
    "HardSigmoid": convert_hardsigmoid,
    "HardSwish": lambda ctx: nn.Hardswish(),
    "Elu": lambda ctx: nn.ELU(float(ctx.attr("alpha", 1.0))),
    "Softplus": lambda ctx: nn.Softplus(),
    "Gelu": lambda ctx: nn.GELU(approximate=ctx.attr("approximate", "none")),
    "PRelu": elementwise(prelu),
    "Softmax": convert_softmax,
    "LogSoftmax": lambda ctx: convert_softmax(ctx, log=True),
    # arithmetic
    "Add": elementwise(torch.add),
    "Sub": elementwise(torch.sub),
    "Mul": elementwise(torch.mul),
    "Div": elementwise(divide),
    "Pow": elementwise(torch.pow),
    "Neg": elementwise(torch.neg),
    "Abs": elementwise(torch.abs),
    "Exp": elementwise(torch.exp),
    "Log": elementwise(torch.log),
    "Sqrt": elementwise(torch.sqrt),
    "Reciprocal": elementwise(torch.reciprocal),
    "Erf": elementwise(torch.erf),
    "Floor": elementwise(torch.floor),
    "Ceil": elementwise(torch.ceil),
    "Max": lambda ctx: function_node(ctx, fold_left, fn=torch.maximum),
    "Min": lambda ctx: function_node(ctx, fold_left, fn=torch.minimum),
    "Sum": lambda ctx: function_node(ctx, fold_left, fn=torch.add),
    # shapes
    "Reshape": convert_reshape,
    "Squeeze": convert_squeeze,
    "Unsqueeze": convert_unsqueeze,
    "Split": convert_split,
    "Concat": lambda ctx: function_node(ctx, concat, axis=int(ctx.attr("axis", 1 if ctx.opset < 4 else None))),
    "Transpose": convert_transpose,
    "Pad": convert_pad,
    "Slice": convert_slice,
    "Expand": lambda ctx: function_node(ctx, expand, ints=(1,)),
    "Shape": lambda ctx: function_node(ctx, shape_of, start=int(ctx.attr("start", 0)), end=ctx.attr("end")),
    "Gather": lambda ctx: function_node(ctx, gather, axis=int(ctx.attr("axis", 0))),
    "Constant": convert_constant,
    "ConstantOfShape": lambda ctx: function_node(ctx, constant_of_shape, value=ctx.attr("value")),
    "Cast": convert_cast,
    "ReduceMean": lambda ctx: convert_reduce(ctx, "mean"),
    "ReduceSum": lambda ctx: convert_reduce(ctx, "sum"),
    "ReduceMax": lambda ctx: convert_reduce(ctx, "max"),
    "ReduceMin": lambda ctx: convert_reduce(ctx, "min"),
}
