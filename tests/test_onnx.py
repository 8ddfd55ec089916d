"""ONNX import: outputs equal onnxruntime's, layers keep names, attribution equals the native model's."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from convlens.attribution import make_method  # noqa: E402
from convlens.errors import ConvlensError  # noqa: E402
from convlens.hooks import auto_layer, capture, resolve_layer  # noqa: E402
from convlens.models import LabNet  # noqa: E402
from convlens.models.onnx_import import load_onnx, looks_like_onnx  # noqa: E402


def export(model: nn.Module, example: torch.Tensor, path) -> str:
    """The TorchScript exporter (no onnxscript needed), batch dimension dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return str(path)


def run_ort(path: str, *inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))[0]


# ------------------------------------------------------------------ networks
class Block(nn.Module):
    """Grouped conv → BN → ReLU6 → depthwise conv → BN, residual add, BN, ReLU6."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.post = nn.BatchNorm2d(c)  # after the add: cannot be folded into a conv by the exporter
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(self.post(x + y))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.block1 = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block2 = Block(16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.pool(self.stem(x)))))
        return self.head(self.gap(x).reshape(x.size(0), -1))  # Shape/Gather/Concat/Reshape at run time


class ShuffleBlock(nn.Module):
    """ShuffleNet v2 style: split the channels, convolve one half, concatenate, shuffle."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                    nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2))
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        keep, work = x.chunk(2, dim=1)
        x = torch.cat([keep, self.branch(work)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


def random_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BN is not an identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def labnet_pair(tmp_path_factory):
    torch.manual_seed(0)
    native = LabNet(mean=0.1307, std=0.3081).eval()
    path = export(native, torch.rand(2, 1, 28, 28), tmp_path_factory.mktemp("onnx") / "labnet.onnx")
    return native, load_onnx(path), path


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded", "bn-kept"])
def test_small_resnet_matches_onnxruntime(tmp_path, keep_bn):
    torch.manual_seed(1)
    native = random_batchnorm(SmallResNet())
    path = str(tmp_path / "resnet.onnx")
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(native, (torch.rand(2, 3, 32, 32),), path, dynamo=False, training=mode,
                          input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    model = load_onnx(path)
    x = torch.randn(5, 3, 37, 29)  # another batch size and an odd spatial size than exported
    with torch.no_grad():
        ours = model(x)
    np.testing.assert_allclose(ours.numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.ReLU6, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear} <= kinds
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert batchnorms == (7 if keep_bn else 2)  # folded into the convs by the exporter, but for the 2 after adds
    grouped = resolve_layer(model, "block1_conv1_Conv")[1]
    assert isinstance(grouped, nn.Conv2d) and grouped.groups == 2

    # Grad-CAM at the last block and guided backprop through the converted ReLU6s equal the native ones
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    cam_native = make_method("gradcam", native, layer="block2").attribute(x)
    cam_onnx = make_method("gradcam", model, layer="block2_act_1_Clip").attribute(x)
    assert cam_onnx.maps.abs().max() > 0
    torch.testing.assert_close(cam_onnx.maps, cam_native.maps, atol=1e-5, rtol=0)
    guided_native = make_method("guided-backprop", native).attribute(x)
    guided_onnx = make_method("guided-backprop", model).attribute(x)
    torch.testing.assert_close(guided_onnx.raw, guided_native.raw, atol=1e-5, rtol=0)


def test_channel_split_and_shuffle(tmp_path):
    """chunk → Slice with computed bounds, reshape with the run-time batch: shape arithmetic at run time."""
    torch.manual_seed(3)
    native = random_batchnorm(ShuffleBlock())
    path = export(native, torch.rand(2, 3, 10, 10), tmp_path / "shuffle.onnx")
    model = load_onnx(path)
    x = torch.rand(3, 3, 10, 10)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), native(x), atol=1e-5, rtol=0)
    cam = make_method("gradcam", model, layer="branch_branch_3_Conv").attribute(x)
    assert cam.maps.shape == (3, 10, 10) and cam.maps.abs().max() > 0


def test_labnet_matches_onnxruntime_and_native(labnet_pair):
    native, model, path = labnet_pair
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(x), native(x)
    np.testing.assert_allclose(ours.numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert model.input_shape == (1, 28, 28)


@pytest.mark.slow
def test_default_dynamo_exporter_gives_the_same_layer_names(labnet_pair, tmp_path):
    """torch's default exporter names nodes ``node_relu_2``; the module path it records names the layers."""
    pytest.importorskip("onnxscript")
    native, legacy, _ = labnet_pair
    path = str(tmp_path / "lab_dynamo.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(native, (torch.rand(2, 1, 28, 28),), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    model = load_onnx(path)
    names = {n for n, _ in model.named_children()}
    assert {"l1_conv_Conv", "l3_relu_Relu", "l4_fc_Gemm", "l5_Gemm"} <= names
    assert model.onnx_names["l3_relu_Relu"].startswith("node_")
    assert names - {n for n, _ in legacy.named_children()} == {"flat_Reshape"}  # torch.export writes Flatten as a view
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
    cam_native = make_method("gradcam", native, layer="l3").attribute(x)
    cam_onnx = make_method("gradcam", model, layer="l3_relu_Relu").attribute(x)
    torch.testing.assert_close(cam_onnx.maps, cam_native.maps, atol=1e-5, rtol=0)


def test_recorded_torch_module_path_names_the_layer(tmp_path):
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="node_conv2d_3")
    conv.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'features', 'features.0', 'conv2d_3']")
    relu = helper.make_node("Relu", ["c"], ["r"], name="node_relu")
    relu.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'relu']")
    odd = helper.make_node("Relu", ["r"], ["y"], name="9/odd name")
    odd.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="not a list")
    path = str(tmp_path / "m.onnx")
    onnx.save(graph_model([conv, relu, odd], {"x": (1, 2, 5, 5)}, {"w": rand(3, 2, 3, 3)}), path)
    model = load_onnx(path)
    assert [n for n, _ in model.named_children()] == ["features_0_Conv", "Relu", "Relu_9_odd_name"]
    assert model.onnx_names == {"features_0_Conv": "node_conv2d_3", "Relu": "node_relu",
                                "Relu_9_odd_name": "9/odd name"}


def test_copy_and_pickle_keep_the_function(labnet_pair, tmp_path):
    """deepcopy (cascading randomization) and pickling of the whole module (worker processes) work."""
    import copy
    import pickle

    nodes, inputs, consts, opset = OP_CASES["arithmetic-constants"]
    path = str(tmp_path / "m.onnx")
    onnx.save(graph_model(nodes, inputs, consts, opset), path)
    x = torch.rand(2, 6, 9, 10)
    for model in (labnet_pair[1], load_onnx(path)):
        clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
        example = x if model is not labnet_pair[1] else torch.rand(2, 1, 28, 28)
        for clone in clones:
            torch.testing.assert_close(clone(example), model(example), atol=0, rtol=0)
        first = next(iter(clones[0].buffers()))
        first.add_(1.0)  # the copy owns its tensors
        assert not torch.equal(first, next(iter(model.buffers())))


def export_fixed_batch(model: nn.Module, example: torch.Tensor, path) -> str:
    """Exported without dynamic axes: the file fixes every dim, the batch size included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["x"])
    return str(path)


def test_fixed_batch_that_the_graph_ignores_stays_free(tmp_path):
    """LabNet flattens with a Flatten node: exported at batch 1, it still runs any batch (checked at load)."""
    torch.manual_seed(0)
    native = LabNet(mean=0.1307, std=0.3081).eval()
    model = load_onnx(export_fixed_batch(native, torch.rand(1, 1, 28, 28), tmp_path / "lab1.onnx"))
    assert model.batch_free
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), native(x), atol=1e-5, rtol=0)
    with pytest.raises(ConvlensError, match=r"input 'x' has shape \(N, 1, 28, 28\), got \(5, 1, 28, 27\)$"):
        model(x[..., 1:])


def test_fixed_batch_baked_into_the_graph_is_enforced(tmp_path):
    """``reshape(x.size(0), -1)`` exported at batch 2 becomes Reshape to [2, -1]: batch 2 only, said clearly."""
    torch.manual_seed(2)
    native = random_batchnorm(SmallResNet())
    path = export_fixed_batch(native, torch.rand(2, 3, 32, 32), tmp_path / "fixed.onnx")
    model = load_onnx(path)
    assert not model.batch_free
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
    with pytest.raises(ConvlensError, match=r"has shape \(2, 3, 32, 32\), got \(5, 3, 32, 32\); .*batch size 2 only"):
        model(torch.rand(5, 3, 32, 32))


def test_labnet_layers_keep_names(labnet_pair):
    _, model, _ = labnet_pair
    names = [n for n, _ in model.named_children()]
    assert names == ["Sub", "Div", "l1_conv_Conv", "l1_relu_Relu", "l1_mp_MaxPool", "l2_conv_Conv",
                     "l2_relu_Relu", "l2_mp_MaxPool", "l3_conv_Conv", "l3_relu_Relu", "l3_mp_MaxPool",
                     "flat_Flatten", "l4_fc_Gemm", "l4_relu_Relu", "l5_Gemm"]
    assert isinstance(resolve_layer(model, "l3_conv_Conv")[1], nn.Conv2d)
    assert isinstance(resolve_layer(model, "l3_relu_Relu")[1], nn.ReLU)
    assert isinstance(resolve_layer(model, "l5_Gemm")[1], nn.Linear)
    assert model.onnx_names["l3_relu_Relu"] == "/l3/relu/Relu"
    assert auto_layer(model, torch.zeros(1, 1, 28, 28)) == "l3_relu_Relu"


def test_labnet_hooks_and_attribution_equal_native(labnet_pair):
    native, model, _ = labnet_pair
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), capture(native, ["l3"]) as a, capture(model, ["l3_relu_Relu"]) as b:
        assert torch.equal(native(x).argmax(1), model(x).argmax(1))
    torch.testing.assert_close(b["l3_relu_Relu"], a["l3"], atol=1e-6, rtol=0)

    cam_native = make_method("gradcam", native, layer="l3").attribute(x)
    cam_onnx = make_method("gradcam", model, layer="l3_relu_Relu").attribute(x)
    assert torch.equal(cam_native.targets, cam_onnx.targets)
    assert cam_onnx.maps.abs().max() > 0
    torch.testing.assert_close(cam_onnx.maps, cam_native.maps, atol=1e-5, rtol=0)

    guided_native = make_method("guided-backprop", native).attribute(x)
    guided_onnx = make_method("guided-backprop", model).attribute(x)
    torch.testing.assert_close(guided_onnx.raw, guided_native.raw, atol=1e-5, rtol=0)
    # the guided rule really ran on the converted ReLUs: the map differs from the plain gradient
    plain = make_method("saliency", model).attribute(x)
    assert (plain.raw - guided_onnx.raw).abs().max() > 1e-3


# ------------------------------------------------------------------ operators, one small graph each
def graph_model(nodes, inputs, consts=None, opset=17, outputs=("y",)):
    """A model from nodes; ``inputs``: name → shape (float32), ``consts``: name → array (initializers)."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in (consts or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


X4 = {"x": (2, 6, 9, 10)}
OP_CASES = {
    "conv-asymmetric-pads": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])],
                             X4, {"w": rand(4, 6, 3, 3), "b": rand(4)}, 17),
    "conv-same-upper-even-kernel": ([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER",
                                                      strides=[2, 2])], X4, {"w": rand(4, 6, 4, 4)}, 17),
    "conv-same-lower": ([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 3])],
                        X4, {"w": rand(4, 6, 4, 3)}, 17),  # onnxruntime refuses SAME with dilation
    "conv-grouped-dilated": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], group=3, dilations=[2, 2],
                                               pads=[2, 2, 2, 2])], X4, {"w": rand(6, 2, 3, 3), "b": rand(6)}, 17),
    "conv-transpose": ([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                                         output_padding=[1, 0])], X4, {"w": rand(6, 4, 3, 3), "b": rand(4)}, 17),
    "batchnorm": ([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], X4,
                  {"s": rand(6), "b": rand(6), "m": rand(6), "v": np.abs(rand(6)) + 0.5}, 15),
    "instance-norm": ([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)], X4,
                      {"s": rand(6), "b": rand(6)}, 17),
    "lrn-odd": ([helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-3, beta=0.75, bias=2.0)], X4, {}, 17),
    "maxpool-ceil-pads": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                            pads=[1, 1, 1, 1], ceil_mode=1)], X4, {}, 17),
    "maxpool-asymmetric": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 2],
                                             pads=[0, 1, 1, 0])], X4, {}, 17),
    "maxpool-same-upper": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                             auto_pad="SAME_UPPER")], X4, {}, 17),
    "avgpool-exclude-pad": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                              pads=[1, 1, 1, 1])], X4, {}, 17),
    "avgpool-include-pad-asym": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 1],
                                                   pads=[1, 0, 0, 2], count_include_pad=1)], X4, {}, 17),
    "avgpool-exclude-pad-asym": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 1],
                                                   pads=[1, 0, 0, 2])], X4, {}, 17),
    "avgpool-ceil": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                       ceil_mode=1)], X4, {}, 17),
    "avgpool-ceil-pads": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                            pads=[1, 1, 1, 1], ceil_mode=1)], X4, {}, 19),
    "global-max-pool": ([helper.make_node("GlobalMaxPool", ["x"], ["y"])], X4, {}, 17),
    "clip-attributes-relu6": ([helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], X4, {}, 10),
    "clip-inputs-hardtanh": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], X4,
                             {"lo": np.float32(-1.0), "hi": np.float32(0.5)}, 13),
    "clip-min-only": ([helper.make_node("Clip", ["x", "lo"], ["y"])], X4, {"lo": np.float32(0.0)}, 13),
    "leaky-relu": ([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], X4, {}, 17),
    "hard-sigmoid": ([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], X4, {}, 17),
    "hard-swish": ([helper.make_node("HardSwish", ["x"], ["y"])], X4, {}, 17),
    "sigmoid-tanh": ([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Tanh", ["s"], ["y"])], X4, {}, 17),
    "softmax-opset11-coerced": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], X4, {}, 11),
    "softmax-opset13-axis": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], X4, {}, 13),
    "gemm-linear": ([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                    {"x": (4, 5)}, {"w": rand(3, 5), "c": rand(1, 3)}, 17),
    "gemm-transA": ([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transA=1, alpha=1.5)],
                    {"x": (5, 4)}, {"w": rand(5, 3), "c": rand(4, 3)}, 17),
    "matmul-constant": ([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": (2, 3, 5)}, {"w": rand(5, 4)}, 17),
    "arithmetic-constants": ([helper.make_node("Sub", ["c", "x"], ["a"]), helper.make_node("Mul", ["a", "c"], ["b"]),
                              helper.make_node("Div", ["b", "d"], ["e"]), helper.make_node("Add", ["e", "x"], ["y"])],
                             X4, {"c": rand(1, 6, 1, 1), "d": np.abs(rand(6, 1, 1)) + 1}, 17),
    "max-min-sum": ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Max", ["x", "r", "c"], ["m"]),
                     helper.make_node("Min", ["m", "c"], ["n"]), helper.make_node("Sum", ["n", "x", "r"], ["y"])],
                    X4, {"c": rand(10)}, 17),
    "unary-chain": ([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Add", ["a", "one"], ["b"]),
                     helper.make_node("Sqrt", ["b"], ["c"]), helper.make_node("Log", ["c"], ["d"]),
                     helper.make_node("Exp", ["d"], ["e"]), helper.make_node("Reciprocal", ["e"], ["f"]),
                     helper.make_node("Neg", ["f"], ["g"]), helper.make_node("Erf", ["g"], ["h"]),
                     helper.make_node("Pow", ["h", "two"], ["i"]), helper.make_node("Mul", ["x", "i"], ["j"]),
                     helper.make_node("Floor", ["j"], ["k"]), helper.make_node("Ceil", ["j"], ["l"]),
                     helper.make_node("Add", ["k", "l"], ["y"])],
                    X4, {"one": np.float32(1.0), "two": np.float32(2.0)}, 17),
    "elu-softplus-gelu-prelu": ([helper.make_node("Elu", ["x"], ["a"], alpha=0.7),
                                 helper.make_node("Softplus", ["a"], ["b"]),
                                 helper.make_node("Gelu", ["x"], ["c"], approximate="tanh"),
                                 helper.make_node("PRelu", ["x", "slope"], ["d"]),
                                 helper.make_node("Sum", ["b", "c", "d"], ["y"])],
                                X4, {"slope": rand(6, 1, 1)}, 20),
    "hard-sigmoid-torch-constants": ([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=1 / 6, beta=0.5)],
                                     X4, {}, 17),
    "reduce-sum-max-min": ([helper.make_node("ReduceSum", ["x", "a"], ["s"], keepdims=1),
                            helper.make_node("ReduceMax", ["x"], ["m"], axes=[2, 3], keepdims=1),
                            helper.make_node("ReduceMin", ["x"], ["n"], axes=[1], keepdims=1),
                            helper.make_node("Add", ["s", "m"], ["t"]), helper.make_node("Add", ["t", "n"], ["y"])],
                           X4, {"a": i64(1)}, 17),
    "matmul-runtime": ([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                        helper.make_node("MatMul", ["x", "t"], ["y"])], X4, {}, 17),
    "split-sizes-input": ([helper.make_node("Split", ["x", "s"], ["a", "b", "c"], axis=1),
                           helper.make_node("Mul", ["a", "c"], ["m"]),
                           helper.make_node("Concat", ["m", "b"], ["y"], axis=1)],
                          X4, {"s": i64(2, 2, 2)}, 13),
    "split-uneven-num-outputs": ([helper.make_node("Split", ["x"], ["a", "b"], axis=3, num_outputs=2),
                                  helper.make_node("Relu", ["b"], ["r"]),
                                  helper.make_node("Concat", ["r", "a"], ["y"], axis=3)],
                                 {"x": (2, 6, 9, 9)}, {}, 18),
    "concat": ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r"], ["y"], axis=1)],
               X4, {}, 17),
    "pad-reflect": ([helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")], X4,
                    {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, 13),
    "pad-constant-value": ([helper.make_node("Pad", ["x", "p", "v"], ["y"])], X4,
                           {"p": i64(0, 1, 0, 3, 0, 0, 2, -1), "v": np.float32(0.5)}, 13),
    "pad-attribute-opset10": ([helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 1, 0, 0, 0, 2], value=2.0)],
                              X4, {}, 10),
    "reduce-squeeze-unsqueeze": ([helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
                                  helper.make_node("Unsqueeze", ["m", "a"], ["u"]),
                                  helper.make_node("Squeeze", ["u", "a"], ["y"])], X4, {"a": i64(-1)}, 13),
    "reduce-mean-opset18": ([helper.make_node("ReduceMean", ["x", "a"], ["y"])], X4, {"a": i64(1, -1)}, 18),
    "transpose": ([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], X4, {}, 17),
    "flatten-axis2": ([helper.make_node("Flatten", ["x"], ["y"], axis=2)], X4, {}, 17),
    "slice-negative-step": ([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])], X4,
                            {"s": i64(-1, 1), "e": i64(-1000, 9), "a": i64(3, 1), "t": i64(-2, 2)}, 17),
    "reshape-zero-minus-one": ([helper.make_node("Reshape", ["x", "s"], ["y"])], X4, {"s": i64(0, -1, 2)}, 17),
    "shape-gather-reshape": ([helper.make_node("Shape", ["x"], ["s"]),
                              helper.make_node("Gather", ["s", "i"], ["n"], axis=0),
                              helper.make_node("Concat", ["n", "m"], ["t"], axis=0),
                              helper.make_node("Reshape", ["x", "t"], ["y"])], {"x": ("n", 6, 9, 10)},
                             {"i": i64(0), "m": i64(-1)}, 17),  # a symbolic batch: computed at run time
    "unsqueeze-squeeze-opset11": ([helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, -1]),
                                   helper.make_node("Squeeze", ["u"], ["y"], axes=[0])], X4, {}, 11),
    "dropout-identity-logsoftmax": ([helper.make_node("Dropout", ["x"], ["d"]),
                                     helper.make_node("Identity", ["d"], ["i"]),
                                     helper.make_node("LogSoftmax", ["i"], ["y"], axis=1)], X4, {}, 13),
    "gemm-no-bias": ([helper.make_node("Gemm", ["x", "w"], ["y"])], {"x": (4, 5)}, {"w": rand(5, 3)}, 17),
    "expand-cast-constant-of-shape": ([helper.make_node("ConstantOfShape", ["s"], ["c"],
                                                        value=numpy_helper.from_array(np.array([3], np.int64))),
                                       helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
                                       helper.make_node("Expand", ["x", "e"], ["b"]),
                                       helper.make_node("Mul", ["b", "f"], ["y"])],
                                      {"x": (2, 1, 5)}, {"s": i64(4, 5), "e": i64(2, 4, 1)}, 17),
    "constant-nodes-folded": ([helper.make_node("Constant", [], ["k"], value_floats=[2.0]),
                               helper.make_node("Mul", ["k", "k"], ["k2"]),
                               helper.make_node("Mul", ["x", "k2"], ["y"])], X4, {}, 17),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_operator_matches_onnxruntime(tmp_path, case):
    nodes, inputs, consts, opset = OP_CASES[case]
    path = str(tmp_path / f"{case}.onnx")
    onnx.save(graph_model(nodes, inputs, consts, opset), path)
    arrays = [rand(*(2 if d == "n" else d for d in shape), seed=7) * 3 for shape in inputs.values()]
    with torch.no_grad():
        ours = load_onnx(path)(*map(torch.from_numpy, arrays))
    expected = run_ort(path, *arrays)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case, module_type", [
    ("clip-attributes-relu6", nn.ReLU6), ("clip-min-only", nn.ReLU), ("clip-inputs-hardtanh", nn.Hardtanh),
    ("conv-asymmetric-pads", nn.Conv2d), ("conv-same-upper-even-kernel", nn.Conv2d), ("batchnorm", nn.BatchNorm2d),
    ("gemm-linear", nn.Linear), ("matmul-constant", nn.Linear), ("maxpool-asymmetric", nn.MaxPool2d),
    ("hard-sigmoid-torch-constants", nn.Hardsigmoid), ("conv-transpose", nn.ConvTranspose2d),
    ("instance-norm", nn.InstanceNorm2d), ("lrn-odd", nn.LocalResponseNorm)])
def test_layers_are_torch_modules(tmp_path, case, module_type):
    nodes, inputs, consts, opset = OP_CASES[case]
    path = str(tmp_path / "m.onnx")
    onnx.save(graph_model(nodes, inputs, consts, opset), path)
    layers = list(load_onnx(path).children())
    assert len(layers) == 1 and isinstance(layers[0], module_type)


def test_lrn_even_window_by_the_formula(tmp_path):
    """onnxruntime refuses an even LRN size; the spec sums ⌊(size−1)/2⌋ channels before, ⌈(size−1)/2⌉ after."""
    path = str(tmp_path / "lrn.onnx")
    node = helper.make_node("LRN", ["x"], ["y"], size=4, alpha=1e-2, beta=0.5, bias=1.5)
    onnx.save(graph_model([node], {"x": (2, 5, 3, 4)}), path)
    x = torch.from_numpy(rand(2, 5, 3, 4)) * 3
    expected = torch.empty_like(x)
    for c in range(5):
        window = (x[:, max(0, c - 1):min(5, c + 3)] ** 2).sum(1)
        expected[:, c] = x[:, c] / (1.5 + 1e-2 / 4 * window) ** 0.5
    torch.testing.assert_close(load_onnx(path)(x), expected)


def test_constants_leave_no_module(tmp_path):
    nodes, inputs, consts, opset = OP_CASES["constant-nodes-folded"]
    path = str(tmp_path / "m.onnx")
    onnx.save(graph_model(nodes, inputs, consts, opset), path)
    model = load_onnx(path)
    assert [type(m).__name__ for m in model.children()] == ["OnnxFunction"]
    torch.testing.assert_close(model(torch.ones(1, 6, 9, 10)), torch.full((1, 6, 9, 10), 4.0))


def test_known_dims_of_a_shape_are_constants(tmp_path):
    """x.size(2) with a symbolic batch but a fixed height: Shape → Gather folds, Mul alone runs."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["h"]),
             helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "f"], ["y"], name="scale")]
    path = str(tmp_path / "m.onnx")
    onnx.save(graph_model(nodes, {"x": ("n", 2, 9, 4)}, {"i": i64(2)}), path)
    model = load_onnx(path)
    assert [n for n, _ in model.named_children()] == ["scale"]
    x = torch.rand(3, 2, 9, 4)
    torch.testing.assert_close(model(x), x * 9)
    np.testing.assert_allclose(model(x).numpy(), run_ort(path, x.numpy()), atol=1e-6)


def test_channels_last_image_input_is_taken_as_nchw(tmp_path):
    """A Keras model through tf2onnx: NHWC input, Rescaling (Mul, Add) in NHWC, then a Transpose to NCHW.
    convlens hands every model NCHW images; the converted model permutes them itself."""
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Add", ["m", "shift"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="model/conv2d/BiasAdd"),
             helper.make_node("Relu", ["c"], ["r"], name="model/conv2d/Relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "dense"], ["y"], name="model/dense/MatMul")]
    consts = {"scale": np.float32([1 / 255, 2 / 255, 3 / 255]), "shift": np.float32([-1, 0, 1]),
              "w": rand(4, 3, 3, 3), "b": rand(4), "dense": rand(4, 5)}
    path = str(tmp_path / "keras.onnx")
    onnx.save(graph_model(nodes, {"x": ("n", 12, 10, 3)}, consts), path)
    model = load_onnx(path)
    assert model.input_shape == (3, 12, 10) and model.channels_last_inputs == {"x"}
    x = torch.rand(2, 3, 12, 10) * 255
    with torch.no_grad():
        ours = model(x)
    np.testing.assert_allclose(ours.numpy(), run_ort(path, x.permute(0, 2, 3, 1).numpy()), atol=1e-4, rtol=0)
    assert isinstance(resolve_layer(model, "model_conv2d_Relu")[1], nn.ReLU)
    with pytest.raises(ConvlensError, match=r"has shape \(N, 3, 12, 10\)"):
        model(x.permute(0, 2, 3, 1))


def test_old_opsets_broadcast_from_axis_and_reshape_attribute(tmp_path):
    """Opset < 7 ``Add(broadcast=1, axis=1)`` adds a per-channel bias; opset < 5 Reshape takes a ``shape``
    attribute. onnxruntime no longer runs such files: the expected values are written out."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], broadcast=1, axis=1),
             helper.make_node("Mul", ["a", "s"], ["m"], broadcast=1),
             helper.make_node("Reshape", ["m"], ["y"], shape=[0, -1])]
    b, scale = rand(6), rand(10)
    path = str(tmp_path / "old.onnx")
    model = graph_model(nodes, X4, {"b": b, "s": scale}, opset=4)
    model.ir_version = 3
    onnx.save(model, path)
    x = torch.from_numpy(rand(2, 6, 9, 10))
    expected = ((x + torch.from_numpy(b)[None, :, None, None]) * torch.from_numpy(scale)).reshape(2, -1)
    torch.testing.assert_close(load_onnx(path)(x), expected)


# ------------------------------------------------------------------ bad input
def test_unsupported_operator_is_named(tmp_path):
    nms = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"], name="nms_1")
    graph = helper.make_graph(
        [nms], "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["k", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)  # a valid file: only our converter refuses it
    path = tmp_path / "nms.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ConvlensError, match=r"^ONNX operator 'NonMaxSuppression' \(node 'nms_1'\) is not supported$"):
        load_onnx(path)


def test_custom_domain_operator_is_named(tmp_path):
    node = helper.make_node("FusedConv", ["x"], ["y"], name="fc", domain="com.microsoft")
    model = graph_model([node], {"x": (1, 1, 2, 2)})
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ConvlensError, match=r"'com.microsoft.FusedConv' \(node 'fc'\)"):
        load_onnx(tmp_path / "m.onnx")


def test_unsupported_second_output(tmp_path):
    node = helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2], name="mp")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ConvlensError, match="node 'mp'.*output 2"):
        load_onnx(tmp_path / "m.onnx")


@pytest.mark.parametrize("content", [b"not an onnx model at all\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b""])
def test_non_onnx_file(tmp_path, content):
    path = tmp_path / "fake.onnx"
    path.write_bytes(content)
    with pytest.raises(ConvlensError, match="not an ONNX model"):
        load_onnx(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConvlensError, match="no such ONNX file"):
        load_onnx(tmp_path / "absent.onnx")


def test_looks_like_onnx():
    assert looks_like_onnx("a/b/Model.ONNX") and not looks_like_onnx("convlens-out/train")


@pytest.mark.slow
def test_efficientnet_lite0_round_trip(tmp_path, lite0):
    """A real ImageNet CNN (ReLU6, depthwise convs, TF-style SAME padding computed in the graph)."""
    native = lite0.model.eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(6)) * 2 - 1
    path = export(native, x, tmp_path / "lite0.onnx")
    model = load_onnx(path)
    with torch.no_grad():
        ours = model(x)
    np.testing.assert_allclose(ours.numpy(), run_ort(path, x.numpy()), atol=1e-4, rtol=0)
    layer = auto_layer(model, x)
    assert layer == "head_act_Clip" and isinstance(resolve_layer(model, layer)[1], nn.ReLU6)
    cam_native = make_method("gradcam", native, layer="_head_act").attribute(x)
    cam_onnx = make_method("gradcam", model, layer=layer).attribute(x)
    torch.testing.assert_close(cam_onnx.maps, cam_native.maps, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cli_on_an_onnx_file(labnet_pair, tmp_path):
    """--model file.onnx in the commands; bad files give one line and exit code 2."""
    from PIL import Image

    from conftest import assert_clean_error, run_cli

    _, _, path = labnet_pair
    proc = run_cli("summary", "--model", path)
    assert proc.returncode == 0, proc.stderr
    assert "l3_relu_Relu" in proc.stdout and "Total params: 7,465" in proc.stdout
    digit = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    out = tmp_path / "explain"
    proc = run_cli("explain", tmp_path / "digit.png", "--model", path, "--layer", "l3_relu_Relu",
                   "--methods", "gradcam,guided-backprop", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    maps = np.load(out / "maps.npz")
    assert maps["gradcam_raw"].shape == (1, 7, 7) and maps["guided-backprop_raw"].shape == (1, 1, 28, 28)

    nms = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"], name="nms_1")
    graph = helper.make_graph([nms], "g", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
                                           helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["k", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "nms.onnx"))
    assert_clean_error(run_cli("summary", "--model", tmp_path / "nms.onnx"),
                       "ONNX operator 'NonMaxSuppression' (node 'nms_1') is not supported")
    (tmp_path / "fake.onnx").write_text("not a model")
    assert_clean_error(run_cli("explain", "--model", tmp_path / "fake.onnx", tmp_path / "digit.png"),
                       "not an ONNX model")
