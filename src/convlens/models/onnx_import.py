"""Load an ONNX file as a torch module whose layers keep the ONNX node names.

``load_onnx("model.onnx")`` returns an :class:`OnnxModel`: one submodule per ONNX node,
named after the node (sanitized: ``/l3/relu/Relu`` → ``l3_relu_Relu``; from torch's dynamo
exporter, after the module path it records, which gives the same names), run in the file's
order. So ``resolve_layer(model, "l3_relu_Relu")``, ``--layer``, forward hooks and every
attribution method work on it as on a native network; convolutions, batch norms, dense
layers, ReLUs and pools are the ordinary torch modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.Linear``, ``nn.ReLU``/``nn.ReLU6``, ``nn.MaxPool2d`` …), which is what the
guided-backprop rule and the layer pickers look for.

Load-time work: nodes whose inputs are all constants (``Constant``, shape arithmetic) are
evaluated once and leave no module; so are ``Shape`` → ``Gather`` of dims the file fixes
(found by running the steps on zeros at two batch sizes, only for graphs with Shape nodes).
The batch dim stays free even where the file fixes it, when a check at load shows the graph
computes per sample (else that batch size is enforced, with a one-line hint); the other
fixed dims are checked on every call. An NHWC image input (Keras through tf2onnx) is taken
NCHW like every other model's.

Why our own converter rather than onnx2torch (1.5.15): importing any part of onnx2torch runs
its ``node_converters/__init__.py``, which imports every converter module, the NMS and
RoiAlign ones included, and those import torchvision — which cannot be imported beside
torch 2.13 here. Importing its submodules selectively is therefore not possible; the only
way in is a stand-in ``torchvision`` (or stand-ins for its nms/roialign modules) in
``sys.modules`` during the import, a process-wide patch that other code importing
torchvision at the same time would see, and that breaks whenever onnx2torch moves those
imports. Its output is also a ``torch.fx`` graph named and built its own way. The CNN
operator set is small (see :mod:`convlens.models.onnx_ops`), its semantics are written in
the ONNX spec, and owning it gives predictable layer names, standard torch layer classes,
and a clear error for anything else:
``ONNX operator 'NonMaxSuppression' (node 'nms_1') is not supported``.

Needs the ``onnx`` package (``pip install 'convlens[onnx]'``).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConvlensError
from .onnx_ops import CONVERTERS, ONNX_DTYPES, NodeContext, runtime_positions

DEFAULT_DOMAINS = ("", "ai.onnx")
BATCH_STAND_INS = (2, 3)  # two sizes for the free batch dim when shapes are traced


def looks_like_onnx(spec: str | Path) -> bool:
    """Whether a ``--model`` value names an ONNX file (by its ``.onnx`` suffix)."""
    return str(spec).lower().endswith(".onnx")


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConvlensError("loading ONNX models needs the onnx package: pip install 'convlens[onnx]'") from None
    return onnx


# ---------------------------------------------------------------- the torch side
class OnnxModel(nn.Module):
    """An ONNX graph as a torch module: one submodule per node, executed in the file's (topological) order.

    ``onnx_names`` maps each submodule's name to its ONNX node name; ``input_shape`` (C, H, W)
    is set when the file declares a static image input. An image input the file takes
    channels-last (Keras / tf2onnx) is given NCHW like every other model and permuted here.
    Every dim the file fixes is checked on each call, but the batch dim when ``batch_free``:
    where the file fixes the batch size, the loader checks that the graph still computes per
    sample for another size (see :func:`batch_is_free`).
    """

    def __init__(self, input_names: list[str], output_names: list[str], input_dims: list[list[int | None] | None]):
        super().__init__()
        self.input_names, self.output_names, self.input_dims = input_names, output_names, input_dims
        self.batch_free = True
        self.channels_last_inputs: set[str] = set()  # image inputs the file takes as NHWC: callers give NCHW
        self.steps: list[Step] = []
        self.onnx_names: dict[str, str] = {}

    def add_step(self, module_name: str, module: nn.Module, inputs: list[str], outputs: list[str], node_name: str):
        self.add_module(module_name, module)
        self.steps.append(Step(module_name, inputs, outputs, unpack=is_multi_output(module)))
        self.onnx_names[module_name] = node_name

    def prune(self) -> None:
        """Drop steps whose outputs nothing uses (e.g. a Shape whose known dims were folded into constants)."""
        live, kept = set(self.output_names), []
        for step in reversed(self.steps):
            if live.intersection(step.outputs):
                kept.append(step)
                live.update(step.inputs)
            else:
                del self._modules[step.module]
                del self.onnx_names[step.module]
        self.steps = kept[::-1]

    def plan_release(self) -> None:
        """After each step, drop the values no later step and no output needs (keeps memory flat)."""
        last_use = {name: i for i, step in enumerate(self.steps) for name in step.inputs}
        keep = set(self.output_names)
        for i, step in enumerate(self.steps):
            step.released = sorted({n for n in step.inputs if last_use[n] == i and n not in keep})

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ConvlensError(f"the ONNX model takes {len(self.input_names)} input(s) "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
        for name, x, dims in zip(self.input_names, inputs, self.input_dims):
            check_input_dims(name, x, dims, self.batch_free)
        values: dict[str, Any] = {name: x.permute(0, 2, 3, 1) if name in self.channels_last_inputs else x
                                  for name, x in zip(self.input_names, inputs)}
        for step in self.steps:
            result = self._modules[step.module](*(values[n] for n in step.inputs))
            store_outputs(values, step.outputs, result, step.unpack)
            for name in step.released:
                del values[name]
        outputs = tuple(values[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


@dataclass
class Step:
    """One node at run time: its module's name, the values it reads and writes."""

    module: str
    inputs: list[str]
    outputs: list[str]
    unpack: bool = False  # the module returns one value per output (Split)
    released: list[str] = field(default_factory=list)


def is_multi_output(module: nn.Module) -> bool:
    return bool(getattr(module, "multi_output", False))


def store_outputs(values: dict, names: list[str], result, unpack: bool) -> None:
    if not unpack:
        values[names[0]] = result
        return
    for name, value in zip(names, result):
        if name:
            values[name] = value


def check_input_dims(name: str, x: torch.Tensor, dims: list[int | None] | None, batch_free: bool) -> None:
    """The dims the file fixes must match (folded shapes depend on them); the batch dim only when not free."""
    if dims is None or not isinstance(x, torch.Tensor):
        return
    fixed = dims[1:] if batch_free else dims
    given = x.shape[1:] if batch_free else x.shape
    if x.dim() == len(dims) and all(d is None or d == n for d, n in zip(fixed, given)):
        return
    wanted = ", ".join("N" if i == 0 and batch_free else "?" if d is None else str(d) for i, d in enumerate(dims))
    hint = ""
    if not batch_free and x.dim() == len(dims) and x.shape[0] != dims[0]:
        hint = (f"; the file was exported for batch size {dims[0]} only: export it again with a dynamic batch "
                f"dim (torch.onnx.export(..., dynamic_axes={{{name!r}: {{0: 'batch'}}}}))")
    raise ConvlensError(f"the ONNX model's input {name!r} has shape ({wanted}), got {tuple(x.shape)}{hint}")


def batch_is_free(model: OnnxModel, dtypes: dict) -> bool:
    """Whether a graph exported for batch size b computes per sample for b + 1 samples too.

    The same random sample repeated b and b + 1 times must give b and b + 1 equal output rows
    (exporters bake the batch into reshapes when it was not declared dynamic, which breaks this).
    """
    gen = torch.Generator().manual_seed(0)
    samples = [torch.rand([1] + dims[1:], generator=gen).to(dtypes[name])
               for name, dims in zip(model.input_names, model.input_dims)]
    reference = None
    for batch in (model.input_dims[0][0], model.input_dims[0][0] + 1):
        try:
            with torch.no_grad():
                out = model(*(x.expand(batch, *x.shape[1:]).contiguous() for x in samples))
        except Exception:  # noqa: BLE001 - a hard-coded batch usually fails here
            return False
        outs = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == batch for o in outs):
            return False
        reference = reference or [o[:1] for o in outs]
        for o, ref in zip(outs, reference):
            tolerance = 1e-4 * max(1.0, float(ref.abs().max())) if ref.is_floating_point() else 0
            if not torch.allclose(o.double(), ref.double().expand_as(o), rtol=0, atol=tolerance):
                return False
    return True


# ---------------------------------------------------------------- reading the file
def read_model(path: str | Path):
    """Parse and validate the file; every failure is one ConvlensError line."""
    onnx = import_onnx()
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors of every kind
        raise ConvlensError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise ConvlensError(f"{path}: not an ONNX model (no graph)")
    check_supported(proto)
    return proto


def check_supported(proto) -> None:
    """The first node whose operator has no converter → ConvlensError naming both."""
    for node in proto.graph.node:
        op = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in CONVERTERS:
            raise ConvlensError(f"ONNX operator {op!r} (node {node.name or '(unnamed)'!r}) is not supported")


def default_opset(proto) -> int:
    return max((imp.version for imp in proto.opset_import if imp.domain in DEFAULT_DOMAINS), default=1)


def to_tensor(array_proto) -> torch.Tensor:
    from onnx import numpy_helper

    array = numpy_helper.to_array(array_proto)
    try:
        return torch.from_numpy(np.array(array, copy=True))
    except TypeError:
        raise ConvlensError(f"ONNX tensor {array_proto.name!r} has a data type torch cannot hold ({array.dtype})") \
            from None


def attributes(node) -> dict[str, Any]:
    """Node attributes as Python values: strings decoded, tensors as torch tensors."""
    from onnx import AttributeProto, helper

    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            out[attr.name] = to_tensor(attr.t)
            continue
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, float):
            value = short_float(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        out[attr.name] = value
    return out


def short_float(value: float) -> float:
    """The shortest decimal with the same float32 value (ONNX stores float32: 1e-05, not 9.99999974e-06)."""
    short = float(f"{value:.7g}")
    return short if np.float32(short) == np.float32(value) else value


def value_ranks(proto) -> dict[str, int]:
    """Rank of every value ONNX shape inference can type (empty when it fails)."""
    from onnx import shape_inference

    try:
        graph = shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - inference is a hint only
        graph = proto.graph
    return {info.name: len(info.type.tensor_type.shape.dim)
            for info in list(graph.value_info) + list(graph.input) + list(graph.output)
            if info.type.tensor_type.HasField("shape")}


def declared_dims(value_info) -> list[int | None] | None:
    """A graph input's dims as the file declares them, None where symbolic (or unknown)."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


class ShapeTracer:
    """Shapes of run-time values, found by running each step on zero inputs at two stand-in batch sizes.

    A dim that differs between the two runs follows the (always free) batch dim; the others are
    fixed, so ``Shape`` → ``Gather`` of them can be folded. Used only for graphs that have Shape
    nodes and whose inputs fix every dim but the batch. Each value is dropped after its last use.
    """

    def __init__(self, inputs, dims, dtypes, last_use: dict[str, int]):
        self.examples = {i.name: tuple(torch.zeros([b, *d[1:]], dtype=dtypes[i.name]) for b in BATCH_STAND_INS)
                         for i, d in zip(inputs, dims)}
        self.last_use = last_use

    def step(self, index: int, module: nn.Module, runtime: list[str], output: str) -> list[int | None] | None:
        """Run the step on the examples; return the output's shape (None where it follows the batch)."""
        outs = None
        if all(name in self.examples for name in runtime):
            try:
                with torch.no_grad():
                    outs = tuple(module(*(self.examples[n][k] for n in runtime)) for k in range(len(BATCH_STAND_INS)))
            except Exception:  # noqa: BLE001 - a step that fails on zeros: its shape stays unknown
                outs = None
        for name in runtime:
            if self.last_use.get(name, -1) <= index:
                self.examples.pop(name, None)
        if outs is None or not all(isinstance(o, torch.Tensor) for o in outs) or outs[0].dim() != outs[1].dim():
            return None
        self.examples[output] = outs
        return [m if m == n else None for m, n in zip(outs[0].shape, outs[1].shape)]


def static_shape_value(ctx: NodeContext, shapes: dict, partial: dict) -> torch.Tensor | None:
    """Shape of a tensor whose dims are known, or Gather of such dims, as a constant.

    ``x.size(2)`` of a network with a fixed input size is ``Shape → Gather``: a constant
    while the batch dim stays free. Partly known Shape outputs are kept in ``partial``.
    """
    if ctx.op == "Shape" and ctx.inputs[0] in shapes:
        dims = shapes[ctx.inputs[0]][int(ctx.attr("start", 0)):ctx.attr("end")]
        if None not in dims:
            return torch.tensor(dims, dtype=torch.int64)
        partial[ctx.outputs[0]] = dims
    elif ctx.op == "Gather" and ctx.inputs[0] in partial and int(ctx.attr("axis", 0)) == 0:
        index = ctx.const(1)
        dims = partial[ctx.inputs[0]]
        if index is not None and not index.is_floating_point() and all(-len(dims) <= i < len(dims)
                                                                          for i in index.flatten().tolist()):
            picked = [dims[i] for i in index.flatten().tolist()]
            if None not in picked:
                return torch.tensor(picked, dtype=torch.int64).reshape(index.shape)
    return None


def static_input_shape(dims: list[int | None] | None) -> tuple[int, ...] | None:
    """(C, H, W …) of an input whose non-batch dims are all fixed numbers."""
    if dims is None or len(dims) < 2 or None in dims[1:]:
        return None
    return tuple(dims[1:])


ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Cast", "Identity"}
TO_NCHW = [0, 3, 1, 2]


def takes_channels_last(graph, name: str, dims: list[int | None] | None) -> bool:
    """Whether a 4-D input is an NHWC image: 1 or 3 channels last, and every path from it runs
    through element-wise ops (a Keras Rescaling layer) into a Transpose to NCHW (as tf2onnx writes it)."""
    if dims is None or len(dims) != 4 or dims[3] not in (1, 3):
        return False
    consumers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    frontier, transposed = [name], False
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm != TO_NCHW:
                    return False
                transposed = True
            elif node.op_type in ELEMENTWISE:
                frontier.extend(node.output)
            else:
                return False
    return transposed


# ---------------------------------------------------------------- names
TORCH_SCOPES = "pkg.torch.onnx.name_scopes"


def node_label(node) -> str:
    """What a node's layer name is made from: its name, or for torch's (dynamo) exporter, which
    names nodes ``node_relu_2``, the module path it records, ``l3.relu`` + op → ``/l3/relu/Relu``,
    as torch's TorchScript exporter names that node."""
    scopes = next((p.value for p in getattr(node, "metadata_props", ()) if p.key == TORCH_SCOPES), None)
    if scopes is None:
        return node.name
    try:
        items = ast.literal_eval(scopes)  # e.g. "['', 'l3', 'l3.relu', 'relu_2']": module scopes, then the op
    except (ValueError, SyntaxError):
        return node.name
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return node.name
    scope = items[-2] if len(items) >= 2 else ""
    return f"/{scope.replace('.', '/')}/{node.op_type}" if scope else f"/{node.op_type}"


def module_name(label: str, op: str, index: int, taken: set[str], owner: nn.Module) -> str:
    """A valid, unique submodule name from a node label (see :func:`node_label`): non-word runs → '_'.

    ``/l3/relu/Relu`` → ``l3_relu_Relu``; an unnamed node → ``<Op>_<index>``; a clash with
    another node or a Module attribute gets ``_2``, ``_3`` ….
    """
    base = re.sub(r"\W+", "_", label).strip("_") or f"{op}_{index}"
    if base[0].isdigit():
        base = f"{op}_{base}"
    name, k = base, 1
    while name in taken or hasattr(owner, name):
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


# ---------------------------------------------------------------- conversion
def convert(proto) -> OnnxModel:
    """ModelProto → OnnxModel (eval mode)."""
    return GraphConverter(proto).run()


class GraphConverter:
    """One pass over the nodes: fold what is constant, turn the rest into named steps."""

    def __init__(self, proto):
        graph = self.graph = proto.graph
        self.opset = default_opset(proto)
        self.consts: dict[str, torch.Tensor] = {init.name: to_tensor(init) for init in graph.initializer}
        self.inputs = [i for i in graph.input if i.name not in self.consts]
        self.dims = [declared_dims(i) for i in self.inputs]  # as the file declares them (NHWC stays NHWC)
        self.dtypes = {i.name: ONNX_DTYPES.get(i.type.tensor_type.elem_type, torch.float32) for i in self.inputs}
        nhwc = {i.name for i, d in zip(self.inputs, self.dims) if takes_channels_last(graph, i.name, d)}
        caller_dims = [[d[0], d[3], d[1], d[2]] if i.name in nhwc else d for i, d in zip(self.inputs, self.dims)]
        self.model = OnnxModel([i.name for i in self.inputs], [o.name for o in graph.output], caller_dims)
        self.model.channels_last_inputs = nhwc
        if len(self.inputs) == 1 and (shape := static_input_shape(caller_dims[0])) is not None:
            self.model.input_shape = shape
        self.consumed = {name for node in graph.node for name in node.input} | set(self.model.output_names)
        self.available = set(self.model.input_names)
        self.taken: set[str] = set()
        # shapes of run-time values: needed only to fold Shape nodes; exact when only batch dims are free
        self.tracer = None
        only_batch_free = all(d is not None and None not in d[1:] for d in self.dims)
        if only_batch_free and any(n.op_type == "Shape" for n in graph.node):
            last_use = {name: k for k, node in enumerate(graph.node) for name in node.input}
            self.tracer = ShapeTracer(self.inputs, self.dims, self.dtypes, last_use)
        self.shapes = {i.name: [None, *d[1:]] for i, d in zip(self.inputs, self.dims)} if self.tracer else {}
        self.ranks = value_ranks(proto) | {name: len(d) for name, d in self.shapes.items()}
        self.partial: dict[str, list[int | None]] = {}

    def run(self) -> OnnxModel:
        for index, node in enumerate(self.graph.node):
            self.add_node(index, node)
        for name in self.model.output_names:
            if name not in self.available:
                raise ConvlensError(f"ONNX graph output {name!r} is a constant or is never computed")
        model = self.model
        model.prune()
        model.plan_release()
        model.eval()
        if any(d and d[0] is not None for d in self.dims):  # the file fixes the batch size: is it really fixed?
            complete = all(d is not None and d[0] is not None and None not in d[1:] for d in self.dims)
            model.batch_free = complete and batch_is_free(model, self.dtypes)
        return model

    def add_node(self, index: int, node) -> None:
        """Fold the node into a constant, or add it as a step (and trace its output shape)."""
        ctx = NodeContext(node.name or f"{node.op_type}_{index}", node.op_type, list(node.input),
                          list(node.output), attributes(node), self.opset, self.consts, self.ranks)
        for name in node.input:
            if name and name not in self.consts and name not in self.available:
                ctx.fail(f"reads {name!r}, which no earlier node produces")
        output = node.output[0]
        if (static := static_shape_value(ctx, self.shapes, self.partial)) is not None:
            self.consts[output] = static
            return
        module = convert_node(ctx)
        outputs = list(node.output) if is_multi_output(module) else [output]
        if not is_multi_output(module):
            check_outputs(ctx, self.consumed)
        runtime = [node.input[p] for p in runtime_positions(module)]
        if all(name in self.consts for name in runtime):  # a constant: evaluate once, keep no module
            store_outputs(self.consts, outputs, fold(ctx, module, [self.consts[n] for n in runtime]),
                          is_multi_output(module))
            return
        name = module_name(node_label(node), node.op_type, index, self.taken, self.model)
        self.model.add_step(name, module, runtime, outputs, ctx.name)
        self.available.update(n for n in outputs if n)
        if is_multi_output(module):
            return  # shapes are traced through single-output steps only
        if self.tracer is not None and (shape := self.tracer.step(index, module, runtime, output)) is not None:
            self.shapes[output] = shape
            self.ranks[output] = len(shape)


def convert_node(ctx: NodeContext) -> nn.Module:
    """The node's converter; a malformed node (missing attribute, wrong constant) → ConvlensError."""
    try:
        return CONVERTERS[ctx.op](ctx)
    except ConvlensError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        ctx.fail(f"cannot be converted ({type(exc).__name__}: {one_line(exc)})")


def fold(ctx: NodeContext, module: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate a node whose inputs are all constants, once, at load time."""
    try:
        with torch.no_grad():
            return module(*inputs)
    except ConvlensError:
        raise
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        ctx.fail(f"fails on its constant inputs ({type(exc).__name__}: {one_line(exc)})")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_outputs(ctx: NodeContext, consumed: set[str]) -> None:
    """Converted nodes compute their first output; any other output must be unused."""
    for k, name in enumerate(ctx.outputs[1:], start=2):
        if name and name in consumed:
            ctx.fail(f"its output {k} ({name!r}) is used, and only the first output is supported")


def load_onnx(path: str | Path) -> nn.Module:
    """An ONNX file → :class:`OnnxModel` in eval mode (see the module docstring)."""
    return convert(read_model(path))
