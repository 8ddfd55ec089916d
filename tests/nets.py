"""Small networks shared by the attribution tests."""
import torch
from torch import nn


class GapNet(nn.Module):
    """conv → ReLU → conv → ReLU (the CAM layer) → GAP → linear; seeded, so every test sees the same weights."""

    def __init__(self, inplace: bool = False, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))
