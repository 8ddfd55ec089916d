"""A small fully convolutional segmentation network: 4 class logits on a 16×16 grid for 32×32 inputs."""
import torch
from torch import nn


class TinySeg(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))))


def build():
    """The factory named on the command line: tinyseg.py:build."""
    return TinySeg()
